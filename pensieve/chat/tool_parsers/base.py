"""What a tool-call format is to the segmenter: markers that open a tool section, and a
section object that reads the call(s) inside it.

The segmenter scans text for a parser's ``start_markers``; at one it opens a section with
``open_section(marker)`` and feeds it the text that follows. The section emits
``ToolCallStart``/``ToolCallDelta``/``ToolCallEnd`` (and ``TextSegment`` for whatever turned
out not to be a call: content is never lost), sets ``done`` when the section is over and
leaves what follows it in ``rest`` for the segmenter to scan as text again.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

from pensieve.chat.segments import Segment, TextSegment
from pensieve.chat.tool_parsers.json_call import CallReadError, JsonCallReader
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE

log = logging.getLogger(__name__)

Schemas = Mapping[str, Mapping[str, Any]]  # tool name → its input JSON schema


class ToolSection(ABC):
    """The text after a start marker, up to the end of the call(s) it opens."""

    def __init__(self) -> None:
        self.done = False
        self.rest = ""  # text after the section's end (valid once done)

    @abstractmethod
    def feed(self, text: str) -> list[Segment]:
        """Segments for ``text``; once ``done``, unread text is in ``rest``."""

    @abstractmethod
    def finish(self) -> list[Segment]:
        """The generation ended inside the section."""


class ToolParser(ABC):
    """One tool-call format. ``schemas`` are the offered tools' input schemas (formats that
    write arguments as untyped text use them to type values)."""

    name: ClassVar[str]
    start_markers: ClassVar[tuple[str, ...]]
    # A "{" as the first thing the model writes (after any thinking) opens a call.
    bare_json_start: ClassVar[bool] = False
    # Text that, after a complete call, means the model is inventing the results: the turn
    # ends there.
    stop_markers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, schemas: Schemas | None = None) -> None:
        self.schemas: Schemas = schemas or {}

    @abstractmethod
    def open_section(self, marker: str) -> ToolSection:
        """A section for the text after ``marker`` (``"{"`` for a bare JSON start, which is
        then part of the call itself)."""


def find_marker(text: str, markers: Sequence[str]) -> tuple[int, str | None]:
    """The earliest (then longest) marker in ``text``: (index, marker), or (-1, None)."""
    best, found = -1, None
    for marker in markers:
        at = text.find(marker)
        if at >= 0 and (best < 0 or at < best or at == best and len(marker) > len(found or "")):
            best, found = at, marker
    return best, found


def partial_marker_length(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that could be the start of a marker."""
    longest = max((len(m) for m in markers), default=0)
    for size in range(min(len(text), longest - 1), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0


class JsonObjectsSection(ToolSection):
    """Call objects read by ``JsonCallReader`` one after another: each may be followed by an
    end marker (``</tool_call>``), a list end (``]``) or a separator and the next call.

    Subclasses set ``end_marker``, ``list_end`` and ``separators``. A malformed call comes
    back as text, marker included (through its end marker, if any); if it had started, its
    tool call is first closed by repair (``ToolCallEnd(complete=False)``).
    ``marker_is_content``: the marker is the call's own first character (a bare ``{``).
    """

    end_marker = ""
    list_end = ""
    separators = ""

    def __init__(
        self, marker: str, *, name_first: bool = False, marker_is_content: bool = False,
        known_names: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        self.name_first = name_first
        self.known_names = known_names
        self._pending = marker if marker_is_content else ""
        self._raw = "" if marker_is_content else marker  # text of the call so far
        self._reader: JsonCallReader | None = self._new_reader()
        self._tail = ""  # text after a call, before we know what follows it
        self._broken = False

    def _new_reader(self) -> JsonCallReader:
        return JsonCallReader(name_first=self.name_first, known_names=self.known_names)

    def feed(self, text: str) -> list[Segment]:
        text, self._pending = self._pending + text, ""
        out: list[Segment] = []
        while text and not self.done:
            if self._broken:
                text = self._skip_to_end(text, out)
            elif self._reader is not None:
                text = self._read(text, out)
            else:
                text = self._after_call(text)
        return out

    def finish(self) -> list[Segment]:
        out = self.feed("") if self._pending else []
        if self._reader is not None and self._reader.started:
            return out + self._reader.finish()
        if self._reader is not None or self._broken:
            log.warning("tool call cut short before it started; kept as text")
            return out + ([TextSegment(self._raw)] if self._raw else [])
        return out

    def _read(self, text: str, out: list[Segment]) -> str:
        assert self._reader is not None
        try:
            segments, used = self._reader.feed(text)
        except CallReadError as exc:
            return self._fail(text, exc, out)
        out.extend(segments)
        self._raw += text[:used]
        if self._reader.done:
            self._reader, self._raw = None, ""
        return text[used:]

    def _fail(self, text: str, exc: CallReadError, out: list[Segment]) -> str:
        assert self._reader is not None
        # A bare JSON object that does not start with "name" is an answer, not a bad call.
        level = logging.DEBUG if self.name_first and not self._reader.started else logging.WARNING
        log.log(level, "not a tool call (%s); kept as text", exc)
        if self._reader.started:  # close what streamed; the whole call also comes back as text
            out.extend(exc.segments)
            out.extend(self._reader.finish())
        self._raw += text[: exc.consumed]
        self._reader, self._broken = None, True
        return text[exc.consumed:]

    def _skip_to_end(self, text: str, out: list[Segment]) -> str:
        """A broken call's text, through its end marker (if the format has one), as text."""
        self._raw += text
        if not self.end_marker:
            cut = len(self._raw)
        else:
            at = self._raw.find(self.end_marker)
            if at < 0:
                return ""
            cut = at + len(self.end_marker)
        if self._raw[:cut]:
            out.append(TextSegment(self._raw[:cut]))
        self.rest, self._raw, self.done = self._raw[cut:], "", True
        return ""

    def _after_call(self, text: str) -> str:
        """After a call: its end marker or the list end, a separator, or something else."""
        self._tail += text
        # Stray closing braces before the end marker are a common slip: skip them.
        tail = self._tail.lstrip(WHITESPACE + "}" if self.end_marker else WHITESPACE)
        if not tail:
            return ""
        ends = [t for t in (self.end_marker, self.list_end) if t]
        for token in ends:
            if tail.startswith(token):
                self._tail, self.done, self.rest = "", True, tail[len(token):]
                return ""
        if tail[0] in self.separators:
            self._tail, self._reader = "", self._new_reader()
            return tail[1:]
        if any(token.startswith(tail) for token in ends):
            return ""  # could still become the end marker
        self.done, self.rest, self._tail = True, self._tail, ""  # not ours: back to text
        return ""
