"""Anthropic conversation → the message dicts a chat template renders.

Text blocks are joined; images become a short placeholder; documents, search and fetch
results, tool references and uploads render as the text ``result_blocks`` gives them. Tool calls and
results render the way the template expects (``HistoryStyle``):

- native: an assistant ``tool_use`` becomes an entry of the message's ``tool_calls``
  (``{"id", "type": "function", "function": {"name", "arguments": {…}}}``), a
  ``tool_result`` a ``{"role": "tool", "tool_call_id", "name", "content"}`` message;
- built-in (the Hermes format of Pensieve's tool prompt): ``<tool_call>`` blocks inside the
  assistant's text, ``<tool_response>`` blocks inside the user's.

Tool inputs are re-serialised byte-stably (fixed separators, keys in the order sent) so a
resent history renders to the same tokens. Thinking blocks render back only when their
signature verifies (``ThinkingHistory``); redacted thinking never does. The volatile
billing header Claude Code puts first in ``system`` is dropped, and so is a mid-conversation
system message with ``clear_at: "next_user_message"`` once a later user message exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pensieve.chat.result_blocks import RESULT_BLOCKS, result_block_text
from pensieve.chat.tool_changes import directive_text
from pensieve.chat.thinking import ThinkingHistory
from pensieve.protocol import (
    ContentBlockParam,
    ConversationParams,
    ImageBlockParam,
    MessageContentParam,
    MessageParam,
    TextBlockParam,
    ThinkingBlockParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)

log = logging.getLogger(__name__)

BLOCK_SEPARATOR = "\n\n"
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"
ERROR_PREFIX = "Error: "

TemplateMessage = dict[str, Any]


@dataclass(frozen=True)
class HistoryStyle:
    """How tool calls and thinking of past turns render for one template."""

    native_tools: bool = False  # tool_calls / "tool" messages (else Hermes text)
    short_tool_ids: bool = False  # Mistral templates insist on 9-character call ids
    thinking: ThinkingHistory | None = None  # None: past thinking is dropped


def canonical_json(value: Any) -> str:
    """JSON text that is the same for the same value, every time (tool inputs)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def tool_call_text(block: ToolUseBlockParam) -> str:
    """A past tool call in the Hermes format of the built-in tool prompt."""
    call = f'{{"name": {canonical_json(block.name)}, "arguments": {canonical_json(block.input)}}}'
    return f"<tool_call>\n{call}\n</tool_call>"


def tool_result_body(block: ToolResultBlockParam) -> str:
    if isinstance(block.content, str) or block.content is None:
        body = block.content or ""
    else:
        body = join_blocks(block.content)
    return ERROR_PREFIX + body if block.is_error else body


def tool_response_text(block: ToolResultBlockParam) -> str:
    """A tool's result in the Hermes format (errors start with ``Error: ``)."""
    return f"<tool_response>\n{tool_result_body(block)}\n</tool_response>"


def block_text(block: ContentBlockParam) -> str | None:
    """The text a block contributes to the prompt, or None when it contributes nothing."""
    if isinstance(block, TextBlockParam):
        return block.text
    if isinstance(block, ToolUseBlockParam):
        return tool_call_text(block)
    if isinstance(block, ToolResultBlockParam):
        return tool_response_text(block)
    if isinstance(block, ImageBlockParam):
        return "[image]"
    if isinstance(block, RESULT_BLOCKS):
        return result_block_text(block)
    directive = directive_text(block)
    if directive is not None:
        return directive
    log.debug("dropping a %s block from the prompt", block.type)
    return None


def join_blocks(blocks: Sequence[ContentBlockParam]) -> str:
    texts = (block_text(b) for b in blocks)
    return BLOCK_SEPARATOR.join(t for t in texts if t is not None)


def content_text(content: MessageContentParam) -> str:
    return content if isinstance(content, str) else join_blocks(content)


def system_text(system: str | Sequence[ContentBlockParam] | None) -> str:
    """The top-level ``system``, without Claude Code's per-request billing header."""
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    kept = [
        b for b in system
        if not (isinstance(b, TextBlockParam) and b.text.startswith(BILLING_HEADER_PREFIX))
    ]
    return join_blocks(kept)


def short_tool_id(tool_use_id: str) -> str:
    """A stable 9-character alphanumeric id for templates that demand one."""
    return hashlib.sha256(tool_use_id.encode("utf-8")).hexdigest()[:9]


def conversation_messages(
    request: ConversationParams, style: HistoryStyle = HistoryStyle(), *, system_suffix: str = ""
) -> list[TemplateMessage]:
    """One dict per entry (tool results may add ``tool`` messages): the system prompt first
    (``system_suffix``, e.g. the built-in tool prompt, joined to it), then ``messages``.

    Roles are left as sent (``system`` may appear mid-conversation); fitting them to what
    a template accepts is ``fit_roles``'s job.
    """
    out: list[TemplateMessage] = []
    system = _merge(system_text(request.system), system_suffix)
    if system:
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}  # tool_use id → tool name, for "tool" messages
    for i, message in enumerate(request.messages):
        if _cleared(request.messages, i):
            log.debug("system message %d: cleared at the next user message; not rendered", i)
            continue
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            out.append(_assistant_message(message.content, style, names))
        else:
            out.extend(_user_messages(message, style, names))
    return out


def _cleared(messages: Sequence[MessageParam], i: int) -> bool:
    """A system message shown only until the next user message, which now exists."""
    if getattr(messages[i], "clear_at", None) != "next_user_message":
        return False
    return any(m.role == "user" for m in messages[i + 1:])


def _assistant_message(
    blocks: Sequence[ContentBlockParam], style: HistoryStyle, names: dict[str, str]
) -> TemplateMessage:
    parts: list[str] = []
    calls: list[dict[str, Any]] = []
    thoughts: list[str] = []
    for block in blocks:
        if isinstance(block, ToolUseBlockParam):
            names[block.id] = block.name
            if style.native_tools:
                calls.append(_template_call(block, style))
            else:
                parts.append(tool_call_text(block))
        elif isinstance(block, ThinkingBlockParam):
            thought = style.thinking.verified(block) if style.thinking else None
            if thought is not None:
                thoughts.append(thought)
        else:
            text = block_text(block)
            if text is not None:
                parts.append(text)
    message: TemplateMessage = {"role": "assistant", "content": BLOCK_SEPARATOR.join(parts)}
    if thoughts and style.thinking is not None:
        thinking = BLOCK_SEPARATOR.join(thoughts)
        if style.thinking.as_field:
            message[style.thinking.field] = thinking
        else:
            message["content"] = style.thinking.wrap(thinking, message["content"])
    if calls:
        message["tool_calls"] = calls
    return message


def _template_call(block: ToolUseBlockParam, style: HistoryStyle) -> dict[str, Any]:
    call_id = short_tool_id(block.id) if style.short_tool_ids else block.id
    return {"id": call_id, "type": "function", "function": {"name": block.name, "arguments": block.input}}


def _user_messages(message: MessageParam, style: HistoryStyle, names: dict[str, str]) -> list[TemplateMessage]:
    """A user (or system) message; with native tools its results become ``tool`` messages."""
    out: list[TemplateMessage] = []
    parts: list[str] = []
    for block in message.content:
        if style.native_tools and isinstance(block, ToolResultBlockParam):
            if parts:
                out.append({"role": message.role, "content": BLOCK_SEPARATOR.join(parts)})
                parts = []
            out.append(_tool_message(block, style, names))
        else:
            text = block_text(block)
            if text is not None:
                parts.append(text)
    if parts or not out:
        out.append({"role": message.role, "content": BLOCK_SEPARATOR.join(parts)})
    return out


def _tool_message(block: ToolResultBlockParam, style: HistoryStyle, names: dict[str, str]) -> TemplateMessage:
    call_id = short_tool_id(block.tool_use_id) if style.short_tool_ids else block.tool_use_id
    return {
        "role": "tool",
        "tool_call_id": call_id,
        "name": names.get(block.tool_use_id, ""),
        "content": tool_result_body(block),
    }


def fit_roles(
    messages: list[TemplateMessage], *, system_first: bool, system_anywhere: bool
) -> list[TemplateMessage]:
    """Reshape ``messages`` for a template, never dropping text.

    A leading system message stays one where the template has a system role. A later one
    (the mid-conversation-system beta: Claude Code sends its environment block this way,
    after the user's prompt) joins the user turn it is next to — the one it follows, else
    the one it precedes — ahead of that turn's own words, so the user's request stays last
    before the reply: rendered as a turn of its own after the prompt, small models answer
    the system text instead of the user. Each message's place depends only on its
    neighbours, so a resent history renders the same and the prefix cache keeps hitting.
    A system message with no user turn next to it keeps its own turn (user text where the
    template cannot place a system turn there). Then consecutive same-role messages merge
    (the API merges consecutive turns too, and many templates insist on alternation) —
    except ``tool`` messages, one per result.
    """
    shaped: list[TemplateMessage] = []
    leads: list[list[str]] = []  # per shaped message: system texts that go before its own
    waiting: list[str] = []  # system texts for the next user turn
    for i, message in enumerate(messages):
        role = message["role"]
        leading = system_first and all(m["role"] == "system" for m in messages[:i])
        if role == "system" and not leading:
            following = messages[i + 1]["role"] if i + 1 < len(messages) else None
            if shaped and shaped[-1]["role"] == "user":
                leads[-1].append(message["content"])
                continue
            if following == "user":
                waiting.append(message["content"])
                continue
            role = "system" if system_anywhere else "user"
        message = {**message, "role": role}
        if shaped and shaped[-1]["role"] == role and role != "tool":
            shaped[-1] = _merge_messages(shaped[-1], message)
        else:
            shaped.append(message)
            leads.append([])
        if role == "user" and waiting:
            leads[-1] += waiting
            waiting = []
    return [
        {**m, "content": _merge(BLOCK_SEPARATOR.join(t for t in lead if t), m["content"])} if lead else m
        for m, lead in zip(shaped, leads)
    ]


def _merge_messages(first: TemplateMessage, second: TemplateMessage) -> TemplateMessage:
    merged = {**first, **second, "content": _merge(first["content"], second["content"])}
    calls = first.get("tool_calls", []) + second.get("tool_calls", [])
    if calls:
        merged["tool_calls"] = calls
    for field in ("reasoning_content", "thinking"):  # the field templates read reasoning from
        reasoning = _merge(first.get(field, ""), second.get(field, ""))
        if reasoning:
            merged[field] = reasoning
    return merged


def _merge(first: str, second: str) -> str:
    if not first:
        return second
    if not second:
        return first
    return first + BLOCK_SEPARATOR + second
