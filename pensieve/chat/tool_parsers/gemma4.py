"""Gemma 4's tool calls: the arguments in Gemma's own object syntax — keys bare, strings
between ``<|"|>`` delimiters (no escapes), numbers, booleans and nesting as in JSON::

    <|tool_call>call:Bash{command:<|"|>ls -la<|"|>,paths:[<|"|>a<|"|>],timeout:5}<tool_call|>

The arguments are translated to JSON as they stream (a bare key or a ``<|"|>`` string becomes
a JSON string) and pass through the incremental JSON scanner, which validates them and makes
every prefix closable. After a call, ``<|tool_response>`` means the model is writing the
result itself: the turn ends there.
"""

from __future__ import annotations

import json
import logging
import re

from pensieve.chat.segments import Segment, TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_parsers.base import ToolParser, ToolSection, partial_marker_length
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE, JsonScanner, JsonSyntaxError

log = logging.getLogger(__name__)

TOOL_CALL_START = "<|tool_call>"
TOOL_CALL_END = "<tool_call|>"
TOOL_RESPONSE = "<|tool_response>"
QUOTE = '<|"|>'
CALL = "call:"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_MAX_HEAD = 300


class GemmaToJson:
    """Gemma object syntax → JSON text, piece by piece. ``done`` once the outer object closed;
    ``rest`` is what followed it."""

    def __init__(self) -> None:
        self.done = False
        self.rest = ""
        self._depth = 0
        self._kinds: list[str] = []  # "{" or "[" per open container
        self._expect_key = False
        self._in_string = False
        self._bare = ""  # a bare key or scalar being read
        self._held = ""  # a possible start of <|"|>

    def feed(self, text: str) -> str:
        text, self._held = self._held + text, ""
        out: list[str] = []
        i = 0
        while i < len(text) and not self.done:
            if self._in_string:
                at = text.find(QUOTE, i)
                if at < 0:
                    keep = partial_marker_length(text[i:], (QUOTE,))
                    out.append(json.dumps(text[i: len(text) - keep], ensure_ascii=False)[1:-1])
                    self._held = text[len(text) - keep:]
                    return "".join(out)
                out.append(json.dumps(text[i:at], ensure_ascii=False)[1:-1] + '"')
                self._in_string, i = False, at + len(QUOTE)
                continue
            if text.startswith(QUOTE, i):
                out.append(self._flush() + '"')
                self._in_string, i = True, i + len(QUOTE)
                continue
            if QUOTE.startswith(text[i:]):  # the text ends with a possible <|"|>
                self._held = text[i:]
                break
            out.append(self._char(text[i]))
            i += 1
        if self.done:
            self.rest = text[i:]
        return "".join(out)

    def _char(self, ch: str) -> str:
        if ch in "{[":
            self._kinds.append(ch)
            self._expect_key = ch == "{"
            return self._flush() + ch
        if ch in "}]":
            out = self._flush() + ch
            if self._kinds:
                self._kinds.pop()
            self.done = not self._kinds
            self._expect_key = False
            return out
        if ch == ",":
            out = self._flush() + ", "
            self._expect_key = bool(self._kinds) and self._kinds[-1] == "{"
            return out
        if ch == ":":
            out = self._flush(key=True) + ": "
            self._expect_key = False
            return out
        if ch in WHITESPACE:
            return ""
        self._bare += ch
        return ""

    def _flush(self, *, key: bool = False) -> str:
        bare, self._bare = self._bare, ""
        if not bare:
            return ""
        return json.dumps(bare, ensure_ascii=False) if key or self._expect_key else bare


class Gemma4Section(ToolSection):
    """``call:NAME{…}<tool_call|>``, from just after ``<|tool_call>``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self._marker = marker
        self._head = ""
        self._reader: GemmaToJson | None = None
        self._scanner = JsonScanner()
        self._tail = ""

    def feed(self, text: str) -> list[Segment]:
        if self.done:
            return []
        if self._reader is None:
            return self._read_head(text)
        if self._reader.done:
            return self._read_tail(text)
        return self._read_args(text)

    def finish(self) -> list[Segment]:
        if self.done:
            return []
        self.done = True
        if self._reader is None:
            return [TextSegment(self._marker + self._head)] if (self._marker + self._head).strip() else []
        if self._reader.done:
            return []
        return [ToolCallDelta(self._scanner.take() + self._scanner.closing()), ToolCallEnd(complete=False)]

    def _read_head(self, text: str) -> list[Segment]:
        self._head += text
        body = self._head.lstrip(WHITESPACE)
        at = body.find("{")
        if at < 0:
            if len(body) > _MAX_HEAD or not (CALL.startswith(body) or body.startswith(CALL)):
                return self._not_a_call()
            return []
        name = body[:at].removeprefix(CALL).strip()
        if not body.startswith(CALL) or not _NAME.fullmatch(name):
            return self._not_a_call()
        self._reader = GemmaToJson()
        return [ToolCallStart(name), *self._read_args(body[at:])]

    def _read_args(self, text: str) -> list[Segment]:
        assert self._reader is not None
        converted = self._reader.feed(text)
        try:
            self._scanner.feed(converted)
        except JsonSyntaxError as exc:
            log.warning("malformed gemma 4 tool call arguments (%s); the call ends there", exc)
            self.done = True
            return [ToolCallDelta(self._scanner.take() + self._scanner.closing()), ToolCallEnd(complete=False)]
        out: list[Segment] = [ToolCallDelta(piece)] if (piece := self._scanner.take()) else []
        if self._reader.done:
            out.append(ToolCallEnd(complete=self._scanner.done))
            out += self._read_tail(self._reader.rest)
        return out

    def _read_tail(self, text: str) -> list[Segment]:
        self._tail += text
        body = self._tail.lstrip(WHITESPACE)
        if body and not (TOOL_CALL_END.startswith(body) and len(body) < len(TOOL_CALL_END)):
            self.done, self.rest = True, body.removeprefix(TOOL_CALL_END)
        return []

    def _not_a_call(self) -> list[Segment]:
        log.warning("text after %s is not a gemma 4 call; kept as text", TOOL_CALL_START)
        self.done = True
        return [TextSegment(self._marker + self._head)]


class Gemma4Parser(ToolParser):
    name = "gemma4"
    start_markers = (TOOL_CALL_START,)
    stop_markers = (TOOL_RESPONSE,)

    def open_section(self, marker: str) -> ToolSection:
        return Gemma4Section(marker)
