"""Anthropic request → prompt text and token ids, through the model's chat template.

``render`` is the only way a request becomes tokens: ``count_tokens`` uses it too, so the
count always equals the ``input_tokens`` reported by ``message_start``.

A trailing assistant message is a prefill: the conversation renders without a generation
prompt and is cut right after that message's text, so the model continues it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pensieve.chat.harmony import THINKING_FIELD, one_call_per_message, reasoning_effort
from pensieve.chat.messages import HistoryStyle, TemplateMessage, conversation_messages, fit_roles
from pensieve.chat.output_format import answer_schema, format_instruction
from pensieve.chat.prompt_text import PromptText, unmark
from pensieve.chat.segmenter import ThinkingMarkers
from pensieve.chat.template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from pensieve.chat.thinking import (
    ThinkingHistory,
    ThinkingPlan,
    ThinkingSigner,
    detect_thinking_markers,
    plan_thinking,
    prompt_opens_thinking,
    request_effort,
    thinking_key_from_env,
)
from pensieve.chat.tool_parsers.harmony import HARMONY_THINKING
from pensieve.chat.tool_formats import DEFAULT_TOOL_FORMAT, detect_tool_format, get_tool_format
from pensieve.chat.tools_prompt import (
    ToolsPlan,
    builtin_tool_prompt,
    native_choice_note,
    plan_tools,
    template_tools,
)
from pensieve.chat.context_edits import apply_context_edits, context_management_of, has_compaction
from pensieve.protocol import ConversationParams
from pensieve.protocol.context_management import BetaContextManagementConfigParam, BetaContextManagementResponse

log = logging.getLogger(__name__)

_PROBE_SYSTEM = "PENSIEVE-PROBE-SYSTEM"
_PROBE_MID_SYSTEM = "PENSIEVE-PROBE-MID-SYSTEM"
_PROBE_TOOL = "pensieve_probe_tool"
_PROBE_TOOL_DESC = "PENSIEVE-PROBE-TOOL-DESCRIPTION"
_PROBE_ARG = "pensieve_probe_argument"
_PROBE_RESULT = "PENSIEVE-PROBE-TOOL-RESULT"
_PROBE_USER = "PENSIEVE-PROBE-USER"
_PROBE_CALL_ID = "probe0001"  # 9 characters: Mistral templates check the length
_PROBE_ERRORS = (ChatTemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


class PromptTokenizer(Protocol):
    """What rendering needs of ``pensieve.loaders.tokenizer.TextTokenizer``."""

    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class RenderedPrompt:
    """A request's prompt, and what the output side (and the engine) must know of it.

    ``tools``: the tools offered and the call format to parse (None: no tools offered, no
    tool parsing). ``thinking``: whether the request thinks, the model's markers, the
    budget, and whether the prompt already opened a thinking section. ``output_schema``: the
    JSON Schema the answer must follow (``output_config.format``), None when free.
    """

    text: str  # what the template produced (without a BOS the renderer prepended as an id)
    token_ids: list[int]
    prefill: str = ""  # the assistant text the model continues, "" when none
    tools: ToolsPlan | None = None
    thinking: ThinkingPlan = field(default_factory=ThinkingPlan)
    output_schema: dict[str, Any] | bool | None = None
    # context_management: the edits applied (reported in the response), and the prompt's
    # length before them (count_tokens reports it); None when the request asked for none
    context_management: BetaContextManagementResponse | None = None
    original_input_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TemplateCaps:
    """What the template can do (found by reading it and rendering probes)."""

    system_first: bool
    system_anywhere: bool
    native_tools: bool = False  # renders tools, assistant tool_calls and "tool" messages
    tool_format: str = DEFAULT_TOOL_FORMAT  # the call format to parse
    thinking_markers: ThinkingMarkers | None = None
    reads_enable_thinking: bool = False
    reads_reasoning_content: bool = False


def _joined(*parts: str) -> str:
    return "\n\n".join(p for p in parts if p)


class PromptRenderer:
    """Renders requests for one model: its tokenizer and its chat template.

    ``chat_template`` None or empty → ChatML. ``template_kwargs`` are passed to every render
    (e.g. ``{"enable_thinking": False}`` as the default for requests that do not say).
    ``thinking_key`` signs thinking blocks (default: ``PENSIEVE_THINKING_KEY`` or random).
    """

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        chat_template: str | None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
        thinking_key: bytes | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate(chat_template or CHATML_TEMPLATE)
        self.template_kwargs = dict(template_kwargs or {})
        self.thinking_key = thinking_key or thinking_key_from_env()
        self.signer = ThinkingSigner(self.thinking_key)
        self.prompt_text = PromptText(tokenizer)  # request text never becomes special tokens
        self.caps = self._probe_caps()
        markers = self.caps.thinking_markers
        self.harmony = markers == HARMONY_THINKING  # gpt-oss: chat/harmony.py
        field = THINKING_FIELD if self.harmony else "reasoning_content"
        self.history_style = HistoryStyle(
            native_tools=self.caps.native_tools,
            short_tool_ids=self.caps.native_tools and get_tool_format(self.caps.tool_format).short_call_ids,
            thinking=ThinkingHistory(self.signer, markers, self.caps.reads_reasoning_content or self.harmony,
                                     field) if markers else None,
        )

    def render(self, request: ConversationParams) -> RenderedPrompt:
        """Prompt for ``request``, its ``context_management`` edits applied
        (``chat/context_edits.py``; ``ContextManagementError`` when malformed)."""
        config = context_management_of(request)
        if config is None and not has_compaction(request):
            return self._render_as_is(request)
        edited = apply_context_edits(request, config or BetaContextManagementConfigParam(), self._render_as_is)
        if config is None:
            return edited.prompt
        return replace(edited.prompt, context_management=edited.applied,
                       original_input_tokens=edited.original_input_tokens)

    def _render_as_is(self, request: ConversationParams) -> RenderedPrompt:
        """Prompt for ``request`` as it is. Raises ``ChatTemplateError`` if the template refuses it.

        A template that renders tools natively but refuses this history (Llama 3.1's allows
        one call per turn) gets the built-in tool rendering instead, rather than an error.
        """
        if not self.caps.native_tools:
            return self._render_request(request, native=False)
        try:
            return self._render_request(request, native=True)
        except ChatTemplateError as exc:
            log.warning("chat template refused native tool rendering (%s); using the built-in tool prompt", exc)
            return self._render_request(request, native=False)

    def _render_request(self, request: ConversationParams, *, native: bool) -> RenderedPrompt:
        caps = self.caps
        tool_format = caps.tool_format if native else DEFAULT_TOOL_FORMAT
        tools = plan_tools(request, tool_format=tool_format, native=native)
        shown = self.prompt_text.mark(request)  # rendered; ``tools`` (unmarked) drive grammars
        shown_tools = tools if shown is request else plan_tools(shown, tool_format=tool_format, native=native)
        thinking = plan_thinking(request, caps.thinking_markers)
        schema = answer_schema(request)  # OutputFormatError when malformed
        suffix = _joined(self._tools_system(shown_tools), format_instruction(answer_schema(shown)))
        style = self.history_style if native else replace(self.history_style, native_tools=False)
        messages = fit_roles(
            conversation_messages(shown, style, system_suffix=suffix),
            system_first=caps.system_first,
            system_anywhere=caps.system_anywhere,
        )
        if self.harmony:
            messages = one_call_per_message(messages)
        hf_tools = template_tools(shown_tools) if shown_tools and native else None
        kwargs = self._kwargs(request, thinking)
        prefill = ""
        last = messages[-1] if messages else {}
        if last.get("role") == "assistant" and not last.get("tool_calls"):
            prefill = last["content"]
            if not prefill.strip():  # an empty prefill is no prefill
                messages, prefill = messages[:-1], ""
        if prefill:
            text = self._render_continuation(messages, hf_tools, prefill, kwargs)
        else:
            text = self._render(messages, hf_tools, add_generation_prompt=True, **kwargs)
        text, ids = self._encode(text)
        thinking = replace(thinking, starts_open=prompt_opens_thinking(text, caps.thinking_markers))
        return RenderedPrompt(text, ids, unmark(prefill), tools, thinking, schema)

    def count_tokens(self, request: ConversationParams) -> int:
        return self.render(request).num_tokens

    def _tools_system(self, tools: ToolsPlan | None) -> str:
        """What the tools add to the system prompt: the built-in section, or for templates
        that list tools themselves only a non-default tool_choice."""
        if tools is None:
            return ""
        return native_choice_note(tools) if tools.native else builtin_tool_prompt(tools)

    def _kwargs(self, request: ConversationParams, thinking: ThinkingPlan) -> dict[str, Any]:
        kwargs = dict(self.template_kwargs)
        if self.caps.reads_enable_thinking and (request.thinking is not None or "enable_thinking" not in kwargs):
            kwargs["enable_thinking"] = thinking.requested
        effort = reasoning_effort(request, thinking) if self.harmony else None
        said = request.thinking is not None or request_effort(request) is not None
        if effort is not None and (said or "reasoning_effort" not in kwargs):  # a renderer default yields to the request
            kwargs["reasoning_effort"] = effort
        return kwargs

    def _render(
        self, messages: list[TemplateMessage], tools: list[dict[str, Any]] | None, *,
        add_generation_prompt: bool, **kwargs: Any,
    ) -> str:
        return self.template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            **(kwargs or self.template_kwargs),
        )

    def _render_continuation(
        self, messages: list[TemplateMessage], tools: list[dict[str, Any]] | None, prefill: str,
        kwargs: dict[str, Any],
    ) -> str:
        """The conversation ending inside the last (assistant) message, right after its text."""
        full = self._render(messages, tools, add_generation_prompt=False, **kwargs)
        # Templates may trim the content: look for it without surrounding whitespace.
        needle = prefill.strip()
        at = full.rfind(needle)
        if at >= 0:
            return full[: at + len(needle)]
        log.debug("prefill not found in the rendered template; appending it to a generation prompt")
        return self._render(messages[:-1], tools, add_generation_prompt=True, **kwargs) + prefill.rstrip()

    def _encode(self, text: str) -> tuple[str, list[int]]:
        """The rendered text without marks, and its ids (BOS prepended where due)."""
        text, ids = self.prompt_text.encode(text)
        tok = self.tokenizer
        bos = tok.bos_token
        if tok.add_bos and tok.bos_token_id is not None and not (bos and text.startswith(bos)):
            ids = [tok.bos_token_id, *ids]
        return text, ids

    def _probe_caps(self) -> TemplateCaps:
        first = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "hi"}]
        mid = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": _PROBE_MID_SYSTEM},
            {"role": "user", "content": "bye"},
        ]
        source = self.template.source
        # The format is read off the probe call as the template renders it; a template that
        # renders calls in a format we do not parse gets the built-in (Hermes) prompt.
        call = self._rendered_tool_call()
        fmt = detect_tool_format(source, call) if call is not None else None
        if call is not None and fmt is None:
            log.info("chat template renders tool calls in a format Pensieve does not parse; "
                     "tools go through the built-in tool prompt")
        native = fmt is not None
        caps = TemplateCaps(
            system_first=self._renders(first, _PROBE_SYSTEM),
            system_anywhere=self._renders(mid, _PROBE_MID_SYSTEM),
            native_tools=native,
            tool_format=fmt or DEFAULT_TOOL_FORMAT,
            thinking_markers=detect_thinking_markers(source),
            reads_enable_thinking="enable_thinking" in source,
            reads_reasoning_content="reasoning_content" in source,
        )
        log.debug("chat template caps: %s", caps)
        return caps

    def _renders(self, messages: list[TemplateMessage], marker: str) -> bool:
        try:
            return marker in self._render(messages, None, add_generation_prompt=True)
        except _PROBE_ERRORS:
            return False

    def _rendered_tool_call(self) -> str | None:
        """The probe's assistant turn (its tool call) as the template renders it, if the
        template lists tools and renders a tool call and its result (else None)."""
        schema = {"type": "object", "properties": {_PROBE_ARG: {"type": "string"}}}
        tool = {"type": "function",
                "function": {"name": _PROBE_TOOL, "description": _PROBE_TOOL_DESC, "parameters": schema}}
        call = {"id": _PROBE_CALL_ID, "type": "function",
                "function": {"name": _PROBE_TOOL, "arguments": {_PROBE_ARG: "x"}}}
        messages = [
            {"role": "user", "content": _PROBE_USER},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": _PROBE_CALL_ID, "name": _PROBE_TOOL, "content": _PROBE_RESULT},
        ]
        try:
            text = self._render(messages, [tool], add_generation_prompt=True)
        except _PROBE_ERRORS:
            return None
        if not all(marker in text for marker in (_PROBE_TOOL_DESC, _PROBE_ARG, _PROBE_RESULT)):
            return None
        start = text.find(_PROBE_USER)
        return text[start + len(_PROBE_USER): text.rfind(_PROBE_RESULT)] if start >= 0 else text
