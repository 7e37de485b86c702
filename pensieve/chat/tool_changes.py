"""Which client tools a conversation offers at its end: deferred tools, tool search and
mid-conversation tool changes.

- ``tools`` entries with ``defer_loading: true`` are held back until loaded: a
  ``tool_reference`` block (what tool search returns, usually inside a ``tool_result``) or a
  ``tool_addition`` directive naming them.
- ``tool_addition`` / ``tool_removal`` blocks in mid-conversation ``system`` messages (the
  mid-conversation-tool-changes beta) add or withdraw a tool from that point on; an addition
  may carry the tool inline (``{"type": "tool_definition", "definition": {…}}``, the
  inline-tools beta). Directives apply in conversation order; the set at the end is what the
  next turn offers (listed once in the system prompt, so earlier turns keep their prefix).
- In place, a directive renders as a one-line note (``[tool added: name]``), so the model
  sees when its tools changed.

A directive naming nothing we know (an MCP toolset, a malformed block) is ignored with a
debug log, never refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from pensieve.protocol import ConversationParams, ToolParam, ToolReferenceBlockParam, ToolResultBlockParam

log = logging.getLogger(__name__)

ADDITION, REMOVAL = "tool_addition", "tool_removal"


def offered_tools(request: ConversationParams) -> tuple[ToolParam, ...]:
    """The client tools the model sees at the end of ``request``, in declaration order
    (tools defined inline come after the declared ones, in the order added)."""
    declared = [t for t in request.tools or () if isinstance(t, ToolParam)]
    known: dict[str, ToolParam] = {t.name: t for t in declared}
    shown = {t.name for t in declared if not t.defer_loading}
    if len(shown) == len(declared) and not _has_directives(request):
        return tuple(declared)
    for kind, tool in _changes(request):
        if isinstance(tool, ToolParam):
            known.setdefault(tool.name, tool)
            name = tool.name
        else:
            name = tool
        if name not in known:
            log.debug("%s names tool %r, which the request does not define; ignored", kind, name)
        elif kind == REMOVAL:
            shown.discard(name)
        else:
            shown.add(name)
    return tuple(t for name, t in known.items() if name in shown)


def directive_text(block: Any) -> str | None:
    """The note a ``tool_addition``/``tool_removal`` block leaves in the prompt (None: not one)."""
    kind = getattr(block, "type", None)
    if kind not in (ADDITION, REMOVAL):
        return None
    name = _directive_tool(block)
    if isinstance(name, ToolParam):
        name = name.name
    verb = "added" if kind == ADDITION else "removed"
    return f"[tool {verb}: {name}]" if name else None


def _has_directives(request: ConversationParams) -> bool:
    return any(getattr(b, "type", None) in (ADDITION, REMOVAL)
               for m in request.messages if isinstance(m.content, list) for b in m.content)


def _changes(request: ConversationParams) -> Iterable[tuple[str, ToolParam | str]]:
    """(kind, tool or name) in conversation order: references load, directives add/remove."""
    for message in request.messages:
        if isinstance(message.content, list):
            yield from _block_changes(message.content)


def _block_changes(blocks: Iterable[Any]) -> Iterable[tuple[str, ToolParam | str]]:
    for block in blocks:
        if isinstance(block, ToolReferenceBlockParam):
            yield ADDITION, block.tool_name
        elif isinstance(block, ToolResultBlockParam) and isinstance(block.content, list):
            yield from _block_changes(block.content)
        elif getattr(block, "type", None) in (ADDITION, REMOVAL):
            tool = _directive_tool(block)
            if tool is not None:
                yield block.type, tool


def _directive_tool(block: Any) -> ToolParam | str | None:
    """What a directive names: a tool's name, or an inline definition (None: unusable)."""
    tool = (getattr(block, "model_extra", None) or {}).get("tool")
    if not isinstance(tool, dict):
        return None
    if tool.get("type") == "tool_definition" and isinstance(tool.get("definition"), dict):
        try:
            return ToolParam.model_validate(tool["definition"])
        except ValidationError:
            log.debug("an inline tool definition that is not a client tool; ignored")
            return None
    name = tool.get("name") or tool.get("tool_name")
    return name if isinstance(name, str) else None
