"""OpenAI's harmony format (gpt-oss): the answer is a stream of messages, each a header and
a body, on three channels::

    <|channel|>analysis<|message|>The user wants the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

    <|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>final<|message|>Sunny.<|return|>

(the generation prompt already wrote the first ``<|start|>assistant``). ``analysis`` is the
reasoning: the segmenter reads it as thinking (``HARMONY_THINKING``: from
``<|channel|>analysis<|message|>`` to ``<|end|>``). A message addressed ``to=functions.NAME``
is a tool call whose body is the arguments' JSON (the recipient may also come before the
channel: ``<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>``, as
the chat template renders past calls). ``final`` (and a ``commentary`` message to no one, a
preamble) is the answer's text. ``<|call|>`` and ``<|return|>`` end the turn (they are
end-of-turn tokens, not text); headers never reach a text block.

The parser reads the headers: a call header opens a section that streams the arguments;
every other header is dropped (a section that ends where it begins).
"""

from __future__ import annotations

import logging
import re

from pensieve.chat.segmenter import ThinkingMarkers
from pensieve.chat.segments import Segment, TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_parsers.base import ToolParser, ToolSection
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE, JsonScanner, JsonSyntaxError

log = logging.getLogger(__name__)

START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
CALL = "<|call|>"
RETURN = "<|return|>"
ANALYSIS = CHANNEL + "analysis" + MESSAGE
FINAL = CHANNEL + "final" + MESSAGE
PREAMBLE = CHANNEL + "commentary" + MESSAGE
NEXT_MESSAGE = START + "assistant"
FUNCTIONS = "functions."

HARMONY_THINKING = ThinkingMarkers(open=ANALYSIS, close=END)

# Headers of a call: the channel first (as the model usually writes it) or the recipient first.
CALL_MARKERS = (CHANNEL + "commentary to=", " to=" + FUNCTIONS)
# Headers and ends that carry no text of their own.
SKIPPED_MARKERS = (NEXT_MESSAGE, FINAL, PREAMBLE, RETURN, CALL)
_RECIPIENT = re.compile(r"[^\s<]+")
_MAX_HEAD = 512


class HarmonyCallSection(ToolSection):
    """``to=functions.NAME … <|message|>{…}<|call|>``, from just after a call marker."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self._marker = marker
        self._head = ""  # the header after the marker, up to <|message|>
        self._scanner: JsonScanner | None = None
        self._tail = ""  # after the arguments: <|call|> may follow

    def feed(self, text: str) -> list[Segment]:
        if self.done:
            return []
        if self._scanner is None:
            return self._read_head(text)
        if self._scanner.done:
            return self._read_tail(text)
        return self._read_args(text)

    def finish(self) -> list[Segment]:
        if self.done:
            return []
        if self._scanner is None:
            self.done = True
            return [TextSegment(self._marker + self._head)]
        if self._scanner.done:
            self.done = True
            return []
        return self._close(complete=self._scanner.end())

    def _read_head(self, text: str) -> list[Segment]:
        self._head += text
        at = self._head.find(MESSAGE)
        if at < 0:
            return self._not_a_call() if len(self._head) > _MAX_HEAD else []
        header, rest = self._head[:at], self._head[at + len(MESSAGE):]
        recipient = (FUNCTIONS if self._marker.endswith(FUNCTIONS) else "") + header
        found = _RECIPIENT.match(recipient)
        if found is None:
            return self._not_a_call()
        name = found.group().removeprefix(FUNCTIONS)
        self._scanner = JsonScanner()
        return [ToolCallStart(name), *self._read_args(rest)]

    def _read_args(self, text: str) -> list[Segment]:
        assert self._scanner is not None
        if not self._scanner.started:
            text = text.lstrip(WHITESPACE)
            if text and text[0] != "{":
                log.warning("harmony tool call arguments are not a JSON object; kept as text")
                return [*self._close(complete=False), TextSegment(text)]
        try:
            used = self._scanner.feed(text)
        except JsonSyntaxError as exc:
            log.warning("malformed harmony tool call arguments (%s)", exc)
            rest = text[exc.consumed:]
            return [*self._close(complete=False), *([TextSegment(rest)] if rest.strip() else [])]
        out: list[Segment] = [ToolCallDelta(piece)] if (piece := self._scanner.take()) else []
        if self._scanner.done:
            out.append(ToolCallEnd())
            out += self._read_tail(text[used:])
        return out

    def _read_tail(self, text: str) -> list[Segment]:
        """After the arguments: the ``<|call|>`` that ends the call, if the text has it."""
        self._tail += text
        body = self._tail.lstrip(WHITESPACE)
        if body and CALL.startswith(body) and len(body) < len(CALL):
            return []  # could still become <|call|>
        if body:
            self.done, self.rest = True, body.removeprefix(CALL)
        return []

    def _close(self, *, complete: bool) -> list[Segment]:
        assert self._scanner is not None
        closing = self._scanner.take() + (self._scanner.closing() if self._scanner.started else "{}")
        self.done = True
        return [ToolCallDelta(closing), ToolCallEnd(complete=complete)]

    def _not_a_call(self) -> list[Segment]:
        log.warning("a harmony header that is not a call; kept as text")
        self.done = True
        return [TextSegment(self._marker + self._head)]


class SkippedHeader(ToolSection):
    """A header or end marker with no text: the section ends where it begins."""

    def feed(self, text: str) -> list[Segment]:
        self.done, self.rest = True, text
        return []

    def finish(self) -> list[Segment]:
        self.done = True
        return []


class HarmonyParser(ToolParser):
    name = "harmony"
    start_markers = CALL_MARKERS + SKIPPED_MARKERS
    # After a call, a message from a tool is the model inventing its result.
    stop_markers = (START + FUNCTIONS,)

    def open_section(self, marker: str) -> ToolSection:
        if marker in CALL_MARKERS:
            return HarmonyCallSection(marker)
        return SkippedHeader()
