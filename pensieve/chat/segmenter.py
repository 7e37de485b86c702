"""Generated text → typed segments (text | thinking | tool call), as the text streams.

Fed the engine's text deltas, the segmenter finds thinking markers (``<think>…</think>``)
and a tool parser's start markers, hands tool sections to the parser, and emits
``Segment``s. Invariants:

- a marker split across deltas is found: text that could be the start of a marker is held
  back until the next delta (or the end) decides; marker text never reaches a text or
  thinking segment (except a malformed call, which comes back whole as text);
- whitespace next to a marker belongs to no one: a text or thinking run is stripped where a
  marker ends it or after a marker starts it (so ``"Sure.\\n\\n<tool_call>"`` gives ``"Sure."``);
- with ``max_calls`` (``disable_parallel_tool_use``), or when the model starts inventing
  tool results after a call (a parser's ``stop_markers``), the segmenter is ``done``: the
  turn is over and the rest of the generation is not wanted.
"""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.chat.segments import Segment, TextSegment, ThinkingSegment, ToolCallEnd
from pensieve.chat.tool_parsers.base import ToolParser, ToolSection, find_marker, partial_marker_length
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE


@dataclass(frozen=True)
class ThinkingMarkers:
    open: str = "<think>"
    close: str = "</think>"


_TEXT, _THINKING, _TOOL = "text", "thinking", "tool"


class Segmenter:
    """One generation's segmenter. ``tool_parser`` None → no tool calls are parsed;
    ``thinking`` None → the model has no reasoning markers."""

    def __init__(
        self,
        *,
        tool_parser: ToolParser | None = None,
        thinking: ThinkingMarkers | None = None,
        start_in_thinking: bool = False,
        max_calls: int | None = None,
    ) -> None:
        self.parser = tool_parser
        self.thinking = thinking
        self.max_calls = max_calls
        self.calls = 0  # complete tool calls so far
        self.done = False
        self._mode = _THINKING if start_in_thinking and thinking else _TEXT
        self._buf = ""  # text not yet segmented (a possible marker start)
        self._space = ""  # trailing whitespace held back: a marker may follow
        self._strip_lead = self._mode == _THINKING  # drop whitespace at the start of the run
        self._run_empty = True  # nothing but whitespace since the last block boundary
        self._section: ToolSection | None = None
        self._dropped = ""  # whitespace dropped before a marker: restored if no call follows
        self._as_text = False  # the last section segment was text (a malformed call)

    @property
    def in_thinking(self) -> bool:
        """The text fed so far ends inside a thinking section."""
        return self._mode == _THINKING

    def feed(self, text: str) -> list[Segment]:
        """Segments that ``text`` completes (maybe none: text can be held back)."""
        if self.done:
            return []
        out: list[Segment] = []
        text = self._buf + text
        self._buf = ""
        while text and not self.done:
            if self._mode == _TOOL:
                text = self._tool(text, out)
            elif self._mode == _THINKING:
                text = self._thinking(text, out)
            else:
                text = self._text(text, out)
        return out

    def finish(self) -> list[Segment]:
        """The generation ended: whatever was held back, and the end of an open call."""
        if self.done:
            return []
        out: list[Segment] = []
        if self._mode == _TOOL and self._section is not None:
            self._take(self._section.finish(), out)
        else:
            self._run(self._buf, out, final=True)
        self._buf = ""
        return out

    # -- modes: each consumes text and returns what is left for the next mode -------------

    def _text(self, text: str, out: list[Segment]) -> str:
        if self._bare_json_start(text):
            return self._open_section("{", text.lstrip(WHITESPACE)[1:], out)
        markers = self._text_markers()
        at, marker = find_marker(text, markers)
        if marker is None:
            keep = partial_marker_length(text, markers)
            if self._run_empty and self.parser and self.parser.bare_json_start and not text.strip():
                keep = len(text)  # only whitespace yet: a "{" may still come
            self._run(text[: len(text) - keep], out, final=False)
            self._buf = text[len(text) - keep:]
            return ""
        self._run(text[:at], out, final=False, before_marker=True)
        rest = text[at + len(marker):]
        if self.thinking and marker == self.thinking.open:
            self._boundary(_THINKING)
            return rest
        if self.thinking and marker == self.thinking.close:  # a stray close: drop it
            self._boundary(_TEXT)
            return rest
        if self.parser and marker in self.parser.stop_markers:
            self.done = True
            return ""
        return self._open_section(marker, rest, out)

    def _thinking(self, text: str, out: list[Segment]) -> str:
        assert self.thinking is not None
        close = self.thinking.close
        at = text.find(close)
        if at < 0:
            keep = partial_marker_length(text, (close,))
            self._run(text[: len(text) - keep], out, final=False)
            self._buf = text[len(text) - keep:]
            return ""
        self._run(text[:at], out, final=False, before_marker=True)
        self._boundary(_TEXT)
        return text[at + len(close):]

    def _tool(self, text: str, out: list[Segment]) -> str:
        assert self._section is not None
        self._take(self._section.feed(text), out)
        if self.done or not self._section.done:
            return ""
        rest = self._section.rest
        self._section = None
        as_text = self._as_text
        self._boundary(_TEXT)
        if as_text:  # a malformed call became text: the text run goes on
            self._strip_lead = self._run_empty = False
        return rest

    def _open_section(self, marker: str, rest: str, out: list[Segment]) -> str:
        assert self.parser is not None
        self._section = self.parser.open_section(marker)
        self._mode = _TOOL
        self._space = ""
        return rest

    # -- helpers --------------------------------------------------------------------------

    def _text_markers(self) -> list[str]:
        markers: list[str] = []
        if self.thinking:
            markers += [self.thinking.open, self.thinking.close]
        if self.parser:
            markers += self.parser.start_markers
            if self.calls:
                markers += self.parser.stop_markers
        return markers

    def _bare_json_start(self, text: str) -> bool:
        return bool(self.parser and self.parser.bare_json_start and self._run_empty
                    and text.lstrip(WHITESPACE).startswith("{"))

    def _boundary(self, mode: str) -> None:
        self._mode = mode
        self._space = self._dropped = ""
        self._strip_lead = True
        self._run_empty = True

    def _run(self, text: str, out: list[Segment], *, final: bool, before_marker: bool = False) -> None:
        """Text of the current text/thinking run, with whitespace at its edges handled."""
        text = self._space + text
        self._space = ""
        if self._strip_lead:
            text = text.lstrip(WHITESPACE)
        # Hold trailing whitespace back only where a marker could follow and strip it.
        hold = not final and (self._mode == _THINKING or bool(self._text_markers()))
        if before_marker:
            body = text.rstrip(WHITESPACE)
            text, self._dropped = body, text[len(body):]
        elif hold:
            body = text.rstrip(WHITESPACE)
            text, self._space = body, text[len(body):]
        if not text:
            return
        self._strip_lead = False
        self._run_empty = False
        out.append(ThinkingSegment(text) if self._mode == _THINKING else TextSegment(text))

    def _take(self, segments: list[Segment], out: list[Segment]) -> None:
        """Adds a section's segments to ``out``, counting complete calls; stops after the
        last call allowed."""
        for segment in segments:
            if isinstance(segment, TextSegment) and self._dropped:
                segment = TextSegment(self._dropped + segment.text)
            self._dropped = ""
            self._as_text = isinstance(segment, TextSegment)
            out.append(segment)
            if isinstance(segment, ToolCallEnd) and segment.complete:
                self.calls += 1
                if self.max_calls is not None and self.calls >= self.max_calls:
                    self.done = True
                    return
