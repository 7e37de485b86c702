"""How a tool-call format's calls look to xgrammar: one builder per shape of call.

A builder turns the offered tools — each a name and the structural-tag *content* that
matches its arguments (JSON text through our EBNF, or Qwen XML parameters) — into the
``format`` of an xgrammar structural tag, for one ``tool_choice`` mode:

- ``forced`` (``any``/``tool``): the answer is calls and nothing else, at least one;
- ``auto``: free text, but once the model writes a trigger (the text every call begins
  with) the call must be one of the tools' and its arguments must match.

Builders: ``TaggedCalls`` (calls one after another: Hermes, Qwen3-Coder, Mistral, Llama 3,
GLM, Gemma 4), ``CallList`` (Mistral's ``[…]``), ``HarmonyCalls`` (gpt-oss's message headers).

``parallel`` False ends the grammar after the first call. The builders know nothing of
schemas or of xgrammar's Python API: they write plain dicts, so they are cheap and testable.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Content = dict[str, Any]  # a structural-tag format matching one tool's arguments
ToolContents = Sequence[tuple[str, Content]]  # (tool name, its arguments' content)


class CallGrammar(ABC):
    """The grammar side of a tool-call format."""

    @abstractmethod
    def forced(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        """Calls only (at least one)."""

    @abstractmethod
    def auto(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        """Free text; constrained from a trigger on."""

    def thinking(self) -> CallGrammar:
        """This grammar for a request that thinks (most formats' thinking is outside the
        grammar's view: the same grammar)."""
        return self


@dataclass(frozen=True)
class TaggedCalls(CallGrammar):
    """Calls written one after another as ``begin(name) + arguments + end``.

    ``trigger`` opens a call under ``auto`` (every ``begin`` starts with it); ``separator``
    goes between parallel calls. ``prefix``: text a call may also start with under ``auto``
    (Llama's ``<|python_tag|>``), which then is a trigger of its own.
    """

    trigger: str
    begin: Callable[[str], str]
    end: str
    separator: str = "\n"
    prefix: str = ""

    def _tags(self, tools: ToolContents, prefix: str = "") -> list[dict[str, Any]]:
        return [{"type": "tag", "begin": prefix + self.begin(name), "content": content, "end": self.end}
                for name, content in tools]

    def forced(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        return {"type": "tags_with_separator", "tags": self._tags(tools), "separator": self.separator,
                "at_least_one": True, "stop_after_first": not parallel}

    def auto(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        tags, triggers = self._tags(tools), [self.trigger]
        if self.prefix:
            tags += self._tags(tools, self.prefix)
            triggers.append(self.prefix)
        return {"type": "triggered_tags", "triggers": triggers, "tags": tags,
                "at_least_one": False, "stop_after_first": not parallel}


@dataclass(frozen=True)
class CallList(CallGrammar):
    """All of a turn's calls in one list after a marker: ``open`` + item, item… + ``close``,
    each item ``item_begin(name) + arguments + item_end`` (Mistral's v3 ``[TOOL_CALLS][…]``)."""

    open: str
    close: str
    item_begin: Callable[[str], str]
    item_end: str
    separator: str = ", "
    trigger: str = ""

    def _list(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        items = [{"type": "tag", "begin": self.item_begin(name), "content": content, "end": self.item_end}
                 for name, content in tools]
        body = {"type": "tags_with_separator", "tags": items, "separator": self.separator,
                "at_least_one": True, "stop_after_first": not parallel}
        return {"type": "tag", "begin": self.open, "content": body, "end": self.close}

    def forced(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        return self._list(tools, parallel)

    def auto(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        return {"type": "triggered_tags", "triggers": [self.trigger or self.open],
                "tags": [self._list(tools, parallel)], "at_least_one": False, "stop_after_first": True}


def json_call_begin(prefix: str, arguments_key: str = "arguments") -> Callable[[str], str]:
    """``prefix{"name": "<name>", "<arguments_key>": `` (the JSON object formats)."""

    def begin(name: str) -> str:
        return f'{prefix}{{"name": {json.dumps(name, ensure_ascii=False)}, "{arguments_key}": '

    return begin


def literal_begin(before: str, after: str) -> Callable[[str], str]:
    """``before + name + after`` (formats that write the name bare)."""
    return lambda name: before + name + after


HERMES_GRAMMAR = TaggedCalls(trigger="<tool_call>", begin=json_call_begin("<tool_call>\n"), end="}\n</tool_call>")
QWEN3_CODER_GRAMMAR = TaggedCalls(
    trigger="<tool_call>", begin=literal_begin("<tool_call>\n<function=", ">\n"), end="</function>\n</tool_call>",
)
MISTRAL_GRAMMAR = TaggedCalls(trigger="[TOOL_CALLS]", begin=literal_begin("[TOOL_CALLS]", "[ARGS]"), end="", separator="")
MISTRAL_LIST_GRAMMAR = CallList(
    open="[TOOL_CALLS][", close="]", item_begin=json_call_begin(""), item_end="}", trigger="[TOOL_CALLS]",
)
LLAMA3_GRAMMAR = TaggedCalls(
    trigger='{"name": ', begin=json_call_begin("", "parameters"), end="}", separator="; ", prefix="<|python_tag|>",
)
JSON_FENCE_GRAMMAR = TaggedCalls(trigger="```json", begin=json_call_begin("```json\n"), end="}\n```")
GEMMA4_GRAMMAR = TaggedCalls(
    trigger="<|tool_call>", begin=literal_begin("<|tool_call>call:", ""), end="<tool_call|>", separator="",
)
GLM_GRAMMAR = TaggedCalls(trigger="<tool_call>", begin=literal_begin("<tool_call>", ""), end="</tool_call>")

# Harmony (gpt-oss). The grammar sees the answer without the reasoning: the thinking tracker
# pauses it from "<|channel|>analysis<|message|>" to "<|end|>", so an analysis message shows
# as its header alone, followed by the next message's "<|start|>assistant". A call ends the
# turn (<|call|> is an end-of-turn token): one call per turn, however parallel is set.
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
HARMONY_NEXT = "<|start|>assistant"
HARMONY_TRIGGERS = ("<|channel|>commentary to=", " to=functions.")


def _harmony_heads(name: str) -> tuple[str, ...]:
    """The headers a call of ``name`` may have: the channel first (as the model writes it),
    the recipient first (as the chat template renders past calls), with or without
    ``<|constrain|>``."""
    return (f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>",
            f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>",
            f" to=functions.{name}<|channel|>commentary json<|message|>")


@dataclass(frozen=True)
class HarmonyCalls(CallGrammar):
    """gpt-oss calls: ``<header to=functions.NAME><|message|>{arguments}``, then <|call|>.

    ``analysis``: a forced call may follow one analysis message — only for a request that
    thinks (its budget bounds the analysis; a second one would be closed at once by the spent
    budget, again and again); otherwise the call comes at once, as a forced tool_choice
    without thinking asks (gpt-oss cannot switch its reasoning off otherwise).
    """

    analysis: bool = False

    def thinking(self) -> CallGrammar:
        return HarmonyCalls(analysis=True)

    def _tags(self, tools: ToolContents) -> list[dict[str, Any]]:
        return [{"type": "tag", "begin": head, "content": content, "end": ""}
                for name, content in tools for head in _harmony_heads(name)]

    def forced(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        calls = {"type": "tags_with_separator", "tags": self._tags(tools), "separator": "",
                 "at_least_one": True, "stop_after_first": True}
        if not self.analysis:
            return calls
        analysis = json.dumps(HARMONY_ANALYSIS + HARMONY_NEXT)
        thinking = {"type": "grammar", "grammar": f"root ::= ({analysis})?"}
        return {"type": "sequence", "elements": [thinking, calls]}

    def auto(self, tools: ToolContents, parallel: bool) -> dict[str, Any]:
        return {"type": "triggered_tags", "triggers": list(HARMONY_TRIGGERS), "tags": self._tags(tools),
                "at_least_one": False, "stop_after_first": True}


HARMONY_GRAMMAR = HarmonyCalls()
