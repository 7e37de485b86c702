"""OpenAI chat and completion requests → what the Anthropic route runs.

A chat request becomes the very ``MessageCreateParams`` an Anthropic client would send for
the same conversation, so both APIs share the renderer (templates, tool formats), the tool
parsers, the grammars, the engine and its prefix cache, and render the same prompt tokens:

- leading ``system``/``developer`` messages → ``system``; later ones stay in place as
  mid-conversation ``system`` messages (as the Anthropic route keeps them);
- an assistant's ``tool_calls`` → ``tool_use`` blocks after its text;
- consecutive ``tool`` messages (and a ``user`` message right after them) → one user message
  of ``tool_result`` blocks (then the text), as the Anthropic API wants them;
- ``tool_choice`` ``required`` → ``any``, a named function → ``tool``,
  ``parallel_tool_calls: false`` → ``disable_parallel_tool_use``.

``response_format`` becomes ``output_config.format`` (structured outputs). What the Anthropic
request cannot say (temperature above 1, ``seed``) is applied to the ``SamplingParams``
afterwards (``openai_sampling``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from pensieve.api.errors import ApiError
from pensieve.engine.types import SamplingParams
from pensieve.protocol import MessageCreateParams
from pensieve.protocol.openai import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionCreateParams,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ContentParam,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SamplingFields,
)
from pensieve.protocol.requests import MAX_TOKENS_LIMIT

_SYSTEM_ROLES = (ChatCompletionSystemMessageParam, ChatCompletionDeveloperMessageParam)
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def invalid_param(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param=param)


def check_unsupported(body: SamplingFields) -> None:
    """400 for what a client relies on and we cannot honour."""
    if body.n is not None and body.n != 1:
        raise invalid_param("n", f"n={body.n} is not supported: this server returns one choice (n=1)")
    if getattr(body, "logprobs", None):
        raise invalid_param("logprobs", "logprobs are not supported by this server")
    if getattr(body, "echo", None):
        raise invalid_param("echo", "echo is not supported by this server")
    if getattr(body, "suffix", None):
        raise invalid_param("suffix", "suffix (insertion) is not supported by this server")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def to_message_params(body: ChatCompletionCreateParams) -> MessageCreateParams:
    """The Anthropic request for ``body`` (sampling beyond the Anthropic ranges is left out)."""
    check_unsupported(body)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    anthropic: dict[str, Any] = {
        "model": body.model,
        "max_tokens": MAX_TOKENS_LIMIT if limit is None else limit,
        "stop_sequences": stop_list(body.stop),
    }
    system, messages = _messages(body)
    if system:
        anthropic["system"] = [{"type": "text", "text": text} for text in system]
    if not messages:
        raise invalid_param("messages", "messages: at least one user or assistant message is required")
    anthropic["messages"] = messages
    tools = [t for t in body.tools or () if isinstance(t, ChatCompletionFunctionToolParam)]
    if tools:
        anthropic["tools"] = [{"name": t.function.name, "description": t.function.description,
                               "input_schema": t.function.parameters or EMPTY_PARAMETERS} for t in tools]
    choice = _tool_choice(body, {t.function.name for t in tools})
    if choice is not None:
        anthropic["tool_choice"] = choice
    output_config = _output_config(body)
    if output_config is not None:
        anthropic["output_config"] = output_config
    return MessageCreateParams.model_validate(anthropic)


def openai_sampling(params: SamplingParams, body: SamplingFields) -> SamplingParams:
    """``params`` (built from the converted request, with the model's defaults) with the
    OpenAI request's own sampling where it sends any: temperature up to 2, top_p, top_k, seed."""
    top_k = getattr(body, "top_k", None)
    return replace(
        params,
        temperature=params.temperature if body.temperature is None else body.temperature,
        top_p=params.top_p if body.top_p is None else body.top_p,
        top_k=params.top_k if top_k is None else top_k,
        seed=body.seed,
    )


def _output_config(body: ChatCompletionCreateParams) -> dict[str, Any] | None:
    """``response_format`` as the Anthropic structured-output request (``json_object``: any
    JSON object); the chat layer adds its instruction and grammar, tools or not."""
    fmt = body.response_format
    if isinstance(fmt, ResponseFormatJSONObject):
        return {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    if isinstance(fmt, ResponseFormatJSONSchema):
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {"type": "object"}
        return {"format": {"type": "json_schema", "schema": schema}}
    return None


def _text(content: ContentParam | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n\n".join(part.text for part in content if getattr(part, "type", None) == "text")


def _messages(body: ChatCompletionCreateParams) -> tuple[list[str], list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(body.messages):
        if isinstance(msg, _SYSTEM_ROLES):
            if out:  # mid-conversation: kept in place
                out.append({"role": "system", "content": _text(msg.content)})
            else:
                system.append(_text(msg.content))
        elif isinstance(msg, ChatCompletionAssistantMessageParam):
            out.append({"role": "assistant", "content": _assistant_blocks(msg, i)})
        elif isinstance(msg, ChatCompletionToolMessageParam):
            block = {"type": "tool_result", "tool_use_id": msg.tool_call_id, "content": _text(msg.content)}
            if _open_tool_results(out):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        else:  # user
            text = _text(msg.content)
            if _open_tool_results(out):
                out[-1]["content"].append({"type": "text", "text": text})
            else:
                out.append({"role": "user", "content": text})
    return system, out


def _open_tool_results(out: list[dict[str, Any]]) -> bool:
    """The last message is a user message of tool results (more may join it)."""
    if not out or out[-1]["role"] != "user" or not isinstance(out[-1]["content"], list):
        return False
    return all(b["type"] == "tool_result" for b in out[-1]["content"])


def _assistant_blocks(msg: ChatCompletionAssistantMessageParam, index: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = _text(msg.content)
    if text:
        blocks.append({"type": "text", "text": text})
    for j, call in enumerate(msg.tool_calls or ()):
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError as exc:
            raise invalid_param(f"messages.{index}.tool_calls.{j}.function.arguments",
                                f"messages.{index}.tool_calls.{j}.function.arguments is not valid JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise invalid_param(f"messages.{index}.tool_calls.{j}.function.arguments",
                                f"messages.{index}.tool_calls.{j}.function.arguments must be a JSON object")
        blocks.append({"type": "tool_use", "id": call.id, "name": call.function.name, "input": arguments})
    return blocks or [{"type": "text", "text": ""}]


def _tool_choice(body: ChatCompletionCreateParams, names: set[str]) -> dict[str, Any] | None:
    choice = body.tool_choice
    no_parallel = body.parallel_tool_calls is False
    if isinstance(choice, ChatCompletionNamedToolChoiceParam):
        if choice.function.name not in names:
            raise invalid_param("tool_choice", f"tool_choice names the function {choice.function.name!r}, "
                                "which is not among the tools")
        return {"type": "tool", "name": choice.function.name, "disable_parallel_tool_use": no_parallel}
    if choice == "required":
        if not names:
            raise invalid_param("tool_choice", "tool_choice 'required' needs at least one function tool")
        return {"type": "any", "disable_parallel_tool_use": no_parallel}
    if choice == "none":
        return {"type": "none"}
    if choice == "auto" or no_parallel:
        return {"type": "auto", "disable_parallel_tool_use": no_parallel}
    return None
