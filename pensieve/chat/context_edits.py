"""Context editing: the request's ``context_management.edits`` applied to the conversation
before it becomes the prompt, as the API applies them server-side (the client keeps its
full history; each request is edited afresh).

- ``clear_tool_uses_20250919``: once ``trigger`` is reached (prompt ``input_tokens``, or the
  number of ``tool_uses`` in the conversation), the results of every tool use but the ``keep``
  most recent (and those of ``exclude_tools``) are replaced, oldest first, by a placeholder
  text; with ``clear_tool_inputs`` (true, or a list of tool names) their calls' inputs are
  emptied too. With ``clear_at_least`` the edit is applied only if it frees that many tokens.
- ``clear_thinking_20251015``: thinking blocks of all but the ``keep`` most recent assistant
  turns are dropped (a turn runs from a user's message to the next; tool loops stay in it).
  ``keep: "all"`` keeps every one.
- A ``compaction`` block sent back in an assistant message (the compaction beta): everything
  before it is dropped and its summary opens the conversation.

Applied edits are reported with the tokens they freed, measured on the rendered prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from pensieve.protocol import ConversationParams
from pensieve.protocol.context_management import (
    BetaAllThinkingTurnsParam,
    BetaClearThinking20251015EditParam,
    BetaClearThinking20251015EditResponse,
    BetaClearToolUses20250919EditParam,
    BetaClearToolUses20250919EditResponse,
    BetaContextManagementConfigParam,
    BetaContextManagementResponse,
    BetaInputTokensTriggerParam,
    UnknownContextEditParam,
)
from pensieve.protocol.requests import UserMessageParam

log = logging.getLogger(__name__)

CLEARED_TOOL_RESULT = "[This tool result was cleared to save context space.]"
COMPACTION_PREFIX = "Summary of the earlier part of this conversation:\n"


class ContextManagementError(ValueError):
    """``context_management`` is malformed (the API answers 400)."""


class Sized(Protocol):
    @property
    def num_tokens(self) -> int: ...


P = TypeVar("P", bound=Sized)


@dataclass(frozen=True)
class EditResult:
    """``request`` edited, its prompt, what was applied, the unedited prompt's length."""

    request: ConversationParams
    prompt: Any
    applied: BetaContextManagementResponse
    original_input_tokens: int


def context_management_of(request: ConversationParams) -> BetaContextManagementConfigParam | None:
    """The request's ``context_management``, validated; None when it has none."""
    raw = (request.model_extra or {}).get("context_management")
    if raw is None:
        return None
    try:
        config = BetaContextManagementConfigParam.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ContextManagementError(f"context_management.{where}: {first['msg']}") from None
    return config


def apply_context_edits(request: ConversationParams, config: BetaContextManagementConfigParam,
                        render: Callable[[ConversationParams], P]) -> EditResult:
    """``request`` with ``config``'s edits applied in order; ``render`` gives a prompt's size."""
    current = drop_before_compaction(request)
    prompt = render(current)
    original = prompt.num_tokens
    applied: list[Any] = []
    for edit in config.edits:
        if isinstance(edit, BetaClearThinking20251015EditParam):
            edited, turns = clear_thinking(current, edit)
            if turns:
                after = render(edited)
                applied.append(BetaClearThinking20251015EditResponse(
                    cleared_input_tokens=max(0, prompt.num_tokens - after.num_tokens),
                    cleared_thinking_turns=turns))
                current, prompt = edited, after
        elif isinstance(edit, BetaClearToolUses20250919EditParam):
            if not _triggered(edit, current, prompt.num_tokens):
                continue
            edited, uses = clear_tool_uses(current, edit)
            if not uses:
                continue
            after = render(edited)
            freed = max(0, prompt.num_tokens - after.num_tokens)
            if edit.clear_at_least is not None and freed < edit.clear_at_least.value:
                log.debug("clear_tool_uses: %d tokens freed < clear_at_least %d; not applied",
                          freed, edit.clear_at_least.value)
                continue
            applied.append(BetaClearToolUses20250919EditResponse(cleared_input_tokens=freed,
                                                                 cleared_tool_uses=uses))
            current, prompt = edited, after
        elif isinstance(edit, UnknownContextEditParam):
            log.debug("context_management: ignoring unknown edit %r", edit.type)
    return EditResult(current, prompt, BetaContextManagementResponse(applied_edits=applied), original)


def _triggered(edit: BetaClearToolUses20250919EditParam, request: ConversationParams, tokens: int) -> bool:
    if isinstance(edit.trigger, BetaInputTokensTriggerParam):
        return tokens >= edit.trigger.value
    return len(_tool_uses(request)) >= edit.trigger.value


def _blocks(message: Any) -> list[Any] | None:
    content = message.content
    return content if isinstance(content, list) else None


def _tool_uses(request: ConversationParams) -> list[tuple[int, int, Any]]:
    """(message index, block index, block) of every ``tool_use``, oldest first."""
    found = []
    for i, message in enumerate(request.messages):
        if message.role == "assistant":
            for j, block in enumerate(_blocks(message) or ()):
                if getattr(block, "type", None) == "tool_use":
                    found.append((i, j, block))
    return found


def clear_tool_uses(request: ConversationParams, edit: BetaClearToolUses20250919EditParam
                    ) -> tuple[ConversationParams, int]:
    """(the edited request, how many tool uses it cleared): all but the ``keep`` most recent,
    never those of ``exclude_tools``; results become ``CLEARED_TOOL_RESULT``."""
    uses = _tool_uses(request)
    keep = edit.keep.value
    candidates = uses[: max(0, len(uses) - keep)]
    excluded = set(edit.exclude_tools or ())
    inputs = edit.clear_tool_inputs
    chosen = {block.id: block.name for _, _, block in candidates if block.name not in excluded}
    if not chosen:
        return request, 0
    messages = list(request.messages)
    cleared: set[str] = set()
    for i, message in enumerate(messages):
        blocks = _blocks(message)
        if blocks is None:
            continue
        new_blocks = []
        for block in blocks:
            kind = getattr(block, "type", None)
            if kind == "tool_result" and block.tool_use_id in chosen and block.content != CLEARED_TOOL_RESULT:
                block = block.model_copy(update={"content": CLEARED_TOOL_RESULT})
                cleared.add(block.tool_use_id)
            elif (kind == "tool_use" and block.id in chosen and block.input
                  and (inputs is True or isinstance(inputs, list) and block.name in inputs)):
                block = block.model_copy(update={"input": {}})
                cleared.add(block.id)
            new_blocks.append(block)
        if new_blocks != blocks:
            messages[i] = message.model_copy(update={"content": new_blocks})
    return request.model_copy(update={"messages": messages}), len(cleared)


def _turns(request: ConversationParams) -> list[int]:
    """The assistant turn of each message (-1 for others): a turn starts at the first
    assistant message after a user message that is not only tool results."""
    turn, opened, out = -1, False, []
    for message in request.messages:
        if message.role == "user":
            blocks = _blocks(message)
            if blocks is None or any(getattr(b, "type", None) != "tool_result" for b in blocks):
                opened = False
            out.append(-1)
        elif message.role == "assistant":
            if not opened:
                turn, opened = turn + 1, True
            out.append(turn)
        else:
            out.append(-1)
    return out


def clear_thinking(request: ConversationParams, edit: BetaClearThinking20251015EditParam
                   ) -> tuple[ConversationParams, int]:
    """(the edited request, how many turns lost thinking): thinking and redacted thinking of
    all but the ``keep`` most recent assistant turns are dropped."""
    keep = edit.keep
    if keep == "all" or isinstance(keep, BetaAllThinkingTurnsParam):
        return request, 0
    turns = _turns(request)
    first_kept = max(turns, default=-1) + 1 - keep.value
    messages = list(request.messages)
    cleared: set[int] = set()
    for i, (message, turn) in enumerate(zip(messages, turns)):
        blocks = _blocks(message)
        if turn < 0 or turn >= first_kept or blocks is None:
            continue
        kept = [b for b in blocks if getattr(b, "type", None) not in ("thinking", "redacted_thinking")]
        if len(kept) != len(blocks):
            cleared.add(turn)
            messages[i] = message.model_copy(update={"content": kept or ""})
    return request.model_copy(update={"messages": messages}), len(cleared)


def has_compaction(request: ConversationParams) -> bool:
    return any(getattr(b, "type", None) == "compaction" for m in request.messages for b in _blocks(m) or ())


def drop_before_compaction(request: ConversationParams) -> ConversationParams:
    """A ``compaction`` block sent back (compaction beta): the messages before it are dropped
    and its summary opens the conversation as a user message; one with a null summary (a
    failed compaction) is a no-op, as in the API."""
    last = None
    for i, message in enumerate(request.messages):
        for j, block in enumerate(_blocks(message) or ()):
            if _compaction_summary(block) is not None:
                last = (i, j)
    if last is None:
        return _without_compaction_blocks(request)
    i, j = last
    message = request.messages[i]
    blocks = _blocks(message) or []
    summary = _compaction_summary(blocks[j])
    opener = {"role": "user", "content": COMPACTION_PREFIX + summary}
    rest = blocks[j + 1:]
    tail = ([message.model_copy(update={"content": rest})] if rest else []) + list(request.messages[i + 1:])
    messages = [UserMessageParam.model_validate(opener), *tail]
    return _without_compaction_blocks(request.model_copy(update={"messages": messages}))


def _compaction_summary(block: Any) -> str | None:
    if getattr(block, "type", None) != "compaction":
        return None
    content = getattr(block, "content", None)
    if content is None and block.model_extra:
        content = block.model_extra.get("content")
    return content if isinstance(content, str) else None


def _without_compaction_blocks(request: ConversationParams) -> ConversationParams:
    """Compaction blocks left in the history (null summaries) render as nothing."""
    messages = list(request.messages)
    changed = False
    for i, message in enumerate(messages):
        blocks = _blocks(message)
        if blocks and any(getattr(b, "type", None) == "compaction" for b in blocks):
            kept = [b for b in blocks if getattr(b, "type", None) != "compaction"]
            messages[i] = message.model_copy(update={"content": kept or ""})
            changed = True
    return request.model_copy(update={"messages": messages}) if changed else request


SUMMARY_INSTRUCTIONS = (
    "Write a summary of the conversation so far that lets it continue from the summary alone: "
    "the user's goals and requests, what has been done (tool calls and the results that still "
    "matter), facts and decisions established, open questions, and where the task stands with "
    "its next step. Be concise and specific. Write only the summary."
)


def summarization_request(body: dict[str, Any], instructions: str | None) -> dict[str, Any]:
    """The request that asks the model for a compaction summary of ``body``'s conversation
    (a JSON body): its messages, then the instructions (``instructions`` replace the default
    ones unless blank) as a user turn; no tool may be called and nothing is edited."""
    prompt = instructions if instructions and instructions.strip() else SUMMARY_INSTRUCTIONS
    summary = {key: value for key, value in body.items()
               if key not in ("context_management", "compaction", "stream", "output_config", "thinking",
                              "tool_choice", "stop_sequences")}
    messages = list(body["messages"])
    last = messages[-1] if messages else None
    if last is not None and last.get("role") == "user":
        content = last["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        messages[-1] = {**last, "content": [*blocks, {"type": "text", "text": prompt}]}
    else:
        messages.append({"role": "user", "content": prompt})
    summary["messages"] = messages
    if summary.get("tools"):
        summary["tool_choice"] = {"type": "none"}
    return summary


def continuation_request(body: dict[str, Any], summary: str | None) -> dict[str, Any]:
    """``body`` (a JSON body) after compaction: its conversation replaced by the summary, the
    last user turn (the request being answered) kept after it; the compaction edit removed."""
    messages = body["messages"]
    last = messages[-1] if messages else None
    opener: list[dict[str, Any]] = [{"type": "text", "text": COMPACTION_PREFIX + (summary or "")}]
    if last is not None and last.get("role") == "user":
        content = last["content"]
        opener += [{"type": "text", "text": content}] if isinstance(content, str) else [
            _as_text(block) for block in content]
    out = {**body, "messages": [{"role": "user", "content": opener}]}
    edits = [e for e in (body.get("context_management") or {}).get("edits", [])
             if isinstance(e, dict) and e.get("type") != "compact_20260112"]
    if "context_management" in body:
        out["context_management"] = {**body["context_management"], "edits": edits}
    return out


def _as_text(block: Any) -> Any:
    """A tool result kept after compaction loses its call (summarised away): its text stays."""
    if not isinstance(block, dict) or block.get("type") != "tool_result":
        return block
    content = block.get("content")
    if isinstance(content, list):
        content = "\n".join(b.get("text", "") for b in content if isinstance(b, dict))
    return {"type": "text", "text": f"[result of the last tool call]\n{content or ''}"}
