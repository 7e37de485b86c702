"""Anthropic conversation → the ``{"role", "content"}`` dicts a chat template renders.

Text blocks are joined; thinking blocks of past turns are dropped (templates re-render
history without them); images and documents become a short placeholder; ``tool_use`` and
``tool_result`` become plain text through ``tool_use_text``/``tool_result_text`` — the seam
where a model's native tool-call format will plug in. The volatile billing header Claude
Code puts first in ``system`` is dropped, so the prompt prefix stays stable across turns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from pensieve.protocol import (
    ContentBlockParam,
    ConversationParams,
    DocumentBlockParam,
    ImageBlockParam,
    MessageContentParam,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)

log = logging.getLogger(__name__)

BLOCK_SEPARATOR = "\n\n"
BILLING_HEADER_PREFIX = "x-anthropic-billing-header:"

TemplateMessage = dict[str, Any]


def tool_use_text(block: ToolUseBlockParam) -> str:
    """A past tool call, as plain text (until tool calls render natively)."""
    arguments = json.dumps(block.input, ensure_ascii=False)
    return f'<tool_use id="{block.id}" name="{block.name}">{arguments}</tool_use>'


def tool_result_text(block: ToolResultBlockParam) -> str:
    """A tool's result, as plain text (until tool results render natively)."""
    if isinstance(block.content, str) or block.content is None:
        body = block.content or ""
    else:
        body = join_blocks(block.content)
    error = ' is_error="true"' if block.is_error else ""
    return f'<tool_result tool_use_id="{block.tool_use_id}"{error}>{body}</tool_result>'


def block_text(block: ContentBlockParam) -> str | None:
    """The text a block contributes to the prompt, or None when it contributes nothing."""
    if isinstance(block, TextBlockParam):
        return block.text
    if isinstance(block, ToolUseBlockParam):
        return tool_use_text(block)
    if isinstance(block, ToolResultBlockParam):
        return tool_result_text(block)
    if isinstance(block, ImageBlockParam):
        return "[image]"
    if isinstance(block, DocumentBlockParam):
        return _document_text(block)
    log.debug("dropping a %s block from the prompt", block.type)
    return None


def _document_text(block: DocumentBlockParam) -> str:
    source = block.source
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        title = f"{block.title}\n" if block.title else ""
        return f"{title}{source['data']}"
    return f"[document: {block.title}]" if block.title else "[document]"


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


def conversation_messages(request: ConversationParams) -> list[TemplateMessage]:
    """One dict per entry: the system prompt first (if any), then ``messages`` in order.

    Roles are left as sent (``system`` may appear mid-conversation); fitting them to what
    a template accepts is ``fit_roles``'s job.
    """
    out: list[TemplateMessage] = []
    system = system_text(request.system)
    if system:
        out.append({"role": "system", "content": system})
    for message in request.messages:
        out.append({"role": message.role, "content": content_text(message.content)})
    return out


def template_tools(request: ConversationParams) -> list[dict[str, Any]] | None:
    """Client tools in the shape Hugging Face templates expect, or None when there are none."""
    tools = [t for t in request.tools or () if isinstance(t, ToolParam)]
    if not tools:
        return None
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
        }
        for t in tools
    ]


def fit_roles(
    messages: list[TemplateMessage], *, system_first: bool, system_anywhere: bool
) -> list[TemplateMessage]:
    """Reshape ``messages`` for a template, never dropping text.

    A system message the template cannot place (not first, or no system role at all)
    becomes user text; then consecutive same-role messages merge (the API merges
    consecutive turns too, and many templates insist on alternation).
    """
    shaped: list[TemplateMessage] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            allowed = system_anywhere or (system_first and i == 0)
            role = "system" if allowed else "user"
        if shaped and shaped[-1]["role"] == role:
            shaped[-1] = {"role": role, "content": _merge(shaped[-1]["content"], message["content"])}
        else:
            shaped.append({"role": role, "content": message["content"]})
    return shaped


def _merge(first: str, second: str) -> str:
    if not first:
        return second
    if not second:
        return first
    return first + BLOCK_SEPARATOR + second
