"""The gpt-oss (harmony) chat template's side of a request: what it must be given.

- ``reasoning_effort`` (low / medium / high: the template writes it into the system message)
  from the request's ``output_config.effort``, else from its thinking budget; a request that
  does not think (thinking absent or ``disabled``) gets ``low``: gpt-oss always reasons, low
  is the least (and the stream shows no thinking block for it, ``stream.py``). Thinking with
  no budget and no effort: the template's default (medium).
- Past turns: the template renders one call per assistant message (``tool_calls[0]``) and
  names a ``tool`` message after the latest call, so an assistant turn with several calls
  becomes one message per call, each followed by its result. Reasoning goes in the
  ``thinking`` field (the messages' ``ThinkingHistory`` is told so); the template refuses a
  call message with both ``content`` and ``thinking``, so such a message's text joins its
  thinking (both are analysis there). It also refuses a ``tool`` message with no call before
  it (a history whose call was cleared or compacted away): such a result becomes user text.

The output side (channels → thinking, text and ``tool_use`` blocks) is
``tool_parsers/harmony.py``.
"""

from __future__ import annotations

from pensieve.chat.messages import BLOCK_SEPARATOR, TemplateMessage
from pensieve.chat.thinking import ThinkingPlan, request_effort
from pensieve.protocol import ConversationParams

THINKING_FIELD = "thinking"  # where the template reads an assistant message's reasoning
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
LOW_BUDGET = 4096  # thinking budgets below this are "low", below HIGH_BUDGET "medium"
HIGH_BUDGET = 16384


def reasoning_effort(request: ConversationParams, plan: ThinkingPlan) -> str | None:
    """The template's ``reasoning_effort`` for ``request`` (None: leave the default)."""
    effort = request_effort(request)
    if effort in EFFORTS:
        return EFFORTS[effort]
    if plan.requested and plan.budget_tokens is not None:
        budget = plan.budget_tokens
        return "low" if budget < LOW_BUDGET else "medium" if budget < HIGH_BUDGET else "high"
    if not plan.requested:
        return "low"
    return None


def one_call_per_message(messages: list[TemplateMessage]) -> list[TemplateMessage]:
    """``messages`` with every assistant turn of several calls split into one message per
    call, each followed by its result (matched by ``tool_call_id``; results with no call
    here keep their place after the turn); a result with no call before it becomes user text."""
    out: list[TemplateMessage] = []
    i = 0
    called = False  # a call since the last answer: the template names a result after it
    while i < len(messages):
        message = messages[i]
        calls = message.get("tool_calls") if message["role"] == "assistant" else None
        i += 1
        if not calls:
            if message["role"] == "tool" and not called:
                message = {"role": "user", "content": message.get("content", "")}
            called = called and message["role"] != "assistant"
            out.append(message)
            continue
        called = True
        results: list[TemplateMessage] = []
        while i < len(messages) and messages[i]["role"] == "tool":
            results.append(messages[i])
            i += 1
        unclaimed = list(results)
        for n, call in enumerate(calls):
            head = _call_message(message) if n == 0 else {"role": "assistant", "content": ""}
            out.append({**head, "tool_calls": [call]})
            result = next((r for r in unclaimed if r.get("tool_call_id") == call.get("id")), None)
            if result is not None:
                unclaimed.remove(result)
                out.append(result)
        out.extend(unclaimed)
    return out


def _call_message(message: TemplateMessage) -> TemplateMessage:
    """The message that carries a turn's first call: its text joins its thinking when it has
    both (the template takes one or the other)."""
    head = {k: v for k, v in message.items() if k != "tool_calls"}
    thinking, content = head.get(THINKING_FIELD), head.get("content")
    if thinking and content:
        head[THINKING_FIELD] = thinking + BLOCK_SEPARATOR + content
        head["content"] = ""
    return head
