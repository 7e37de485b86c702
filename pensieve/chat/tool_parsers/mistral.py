"""Mistral formats, both behind ``[TOOL_CALLS]``:

- a JSON array of call objects (v3 tokenizers)::

      [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {…}]

- name then arguments (v11+ tokenizers), one marker per call, optionally with a call id::

      [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}
      [TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}
"""

from __future__ import annotations

import logging
import re

from pensieve.chat.segments import Segment, TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_parsers.base import JsonObjectsSection, ToolParser, ToolSection
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE, JsonScanner, JsonSyntaxError

log = logging.getLogger(__name__)

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
_MAX_HEAD = 512  # name + call id: longer means this is not a call


class MistralArraySection(JsonObjectsSection):
    list_end = "]"
    separators = ","


class MistralNamedSection(ToolSection):
    """``name[ARGS]{…}``: the name is known before the arguments, which stream."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self._raw = marker
        self._head = ""  # name (and call id) before [ARGS]
        self._scanner: JsonScanner | None = None

    def feed(self, text: str) -> list[Segment]:
        if self.done:
            return []
        if self._scanner is None:
            return self._read_head(text)
        return self._read_args(text)

    def finish(self) -> list[Segment]:
        if self._scanner is None:
            return [TextSegment(self._raw + self._head)]
        return self._close(complete=False)

    def _read_head(self, text: str) -> list[Segment]:
        self._head += text
        at = self._head.find(ARGS)
        if at < 0:
            if len(self._head) > _MAX_HEAD or not _could_be_head(self._head):
                return self._not_a_call(self._head)
            return []
        name = self._head[:at].split(CALL_ID, 1)[0].strip()
        rest = self._head[at + len(ARGS):]
        if not _NAME.fullmatch(name):
            return self._not_a_call(self._head)
        self._scanner = JsonScanner()
        return [ToolCallStart(name), *self._read_args(rest)]

    def _read_args(self, text: str) -> list[Segment]:
        assert self._scanner is not None
        if not self._scanner.started:
            text = text.lstrip(WHITESPACE)
            if text and text[0] != "{":
                log.warning("mistral tool call arguments are not an object; kept as text")
                return [*self._close(complete=False), *self._as_text(text)]
        try:
            used = self._scanner.feed(text)
        except JsonSyntaxError as exc:
            log.warning("malformed mistral tool call arguments (%s)", exc)
            return [*self._close(complete=False), *self._as_text(text[exc.consumed:])]
        out: list[Segment] = [ToolCallDelta(piece)] if (piece := self._scanner.take()) else []
        if self._scanner.done:
            out.append(ToolCallEnd())
            self.done, self.rest = True, text[used:]
        return out

    def _close(self, *, complete: bool) -> list[Segment]:
        assert self._scanner is not None
        closing = self._scanner.take() + (self._scanner.closing() if self._scanner.started else "{}")
        self.done = True
        return [ToolCallDelta(closing), ToolCallEnd(complete=complete)]

    def _as_text(self, text: str) -> list[Segment]:
        self.done = True
        return [TextSegment(text)] if text else []

    def _not_a_call(self, head: str) -> list[Segment]:
        log.warning("text after %s is not a tool call; kept as text", TOOL_CALLS)
        self.done = True
        return [TextSegment(self._raw + head)]


def _could_be_head(head: str) -> bool:
    """Can ``head`` still grow into ``name[ARGS]`` or ``name[CALL_ID]id[ARGS]``?"""
    name, sep, call_id = head.partition(CALL_ID)
    if sep:
        return bool(_NAME.fullmatch(name)) and not any(c in WHITESPACE for c in call_id)
    at = name.find("[")
    if at < 0:
        return not name or bool(_NAME.fullmatch(name))
    marker = name[at:]
    return (at == 0 or bool(_NAME.fullmatch(name[:at]))) and (
        CALL_ID.startswith(marker) or ARGS.startswith(marker)
    )


class MistralSection(ToolSection):
    """Decides which form follows the marker, then delegates to that section."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self._marker = marker
        self._lead = ""
        self._inner: ToolSection | None = None

    def feed(self, text: str) -> list[Segment]:
        if self._inner is None:
            self._lead += text
            body = self._lead.lstrip(WHITESPACE)
            if not body:
                return []
            if body[0] == "[":
                lead = self._lead[: len(self._lead) - len(body)]
                self._inner, text = MistralArraySection(self._marker + lead + "["), body[1:]
            elif body[0] == "{":
                self._inner, text = MistralArraySection("{", marker_is_content=True), body[1:]
            else:
                self._inner, text = MistralNamedSection(self._marker), body
        out = self._inner.feed(text)
        self.done, self.rest = self._inner.done, self._inner.rest
        return out

    def finish(self) -> list[Segment]:
        if self._inner is None:
            return [TextSegment(self._marker + self._lead)] if self._lead.strip() else []
        return self._inner.finish()


class MistralParser(ToolParser):
    name = "mistral"
    start_markers = (TOOL_CALLS,)

    def open_section(self, marker: str) -> ToolSection:
        return MistralSection(marker)
