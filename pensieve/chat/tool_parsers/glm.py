"""GLM XML format (GLM-4.5, 4.6, 4.7): the name after the marker, then key/value pairs::

    <tool_call>Bash<arg_key>command</arg_key><arg_value>ls -la</arg_value><arg_key>timeout</arg_key><arg_value>5</arg_value></tool_call>

GLM-4.5/4.6 put newlines between the pieces (``<tool_call>Bash\\n<arg_key>…``); both read.
As the templates write them, a value the tool's schema types as a string is raw text and
any other value is JSON. The arguments stream as JSON we write: a free string value streams
as a JSON string while it is generated, whitespace and all (a file's text); a constrained
string (enum, const, pattern, format, length) and any other value are read when complete,
without the whitespace around them that the grammar (xgrammar's ``glm_xml``) allows there,
and other values parsed as JSON (a value that is not JSON becomes a string).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pensieve.chat.segments import Segment, TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_parsers.base import Schemas, ToolParser, ToolSection, partial_marker_length
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE
from pensieve.chat.tool_parsers.qwen3_coder import is_string_schema, typed_value

log = logging.getLogger(__name__)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
ARG_KEY = "<arg_key>"
ARG_KEY_END = "</arg_key>"
ARG_VALUE = "<arg_value>"
ARG_VALUE_END = "</arg_value>"
_NAME_ENDS = (ARG_KEY, TOOL_CALL_END, "\n")
_MAX_NAME = 256
_CONSTRAINED_STRING = ("enum", "const", "pattern", "format", "minLength", "maxLength")
_NOT_IN_NAMES = '<>{}"'

_HEAD, _BODY, _KEY, _BEFORE_VALUE, _VALUE, _DONE = range(6)


class GlmSection(ToolSection):
    """One ``<tool_call>`` … ``</tool_call>`` (the marker already read)."""

    def __init__(self, marker: str, schemas: Schemas) -> None:
        super().__init__()
        self._schemas = schemas
        self._raw = marker  # text of a call that turns out not to be one
        self._buf = ""
        self._state = _HEAD
        self._properties: dict[str, Any] = {}
        self._params = 0
        self._key = ""
        self._held_key = ""
        self._text = False  # the current value is a string
        self._streaming = False  # the current value streams as a JSON string
        self._collected = ""  # a non-string value's text, parsed when complete

    def feed(self, text: str) -> list[Segment]:
        self._buf += text
        out: list[Segment] = []
        steps = (self._head, self._body, self._read_key, self._before_value, self._read_value)
        while not self.done and steps[self._state](out):
            pass
        return out

    def finish(self) -> list[Segment]:
        if self.done:
            return []
        self.done = True
        if self._state == _HEAD:
            text = self._raw + self._buf
            return [TextSegment(text)] if text.strip() else []
        out: list[Segment] = []
        if self._state == _VALUE:
            self._add_value(self._buf, out)
            self._close_value(out)
        return out + [ToolCallDelta("}"), ToolCallEnd(complete=False)]

    # -- states: each returns whether it made progress ------------------------------------

    def _head(self, out: list[Segment]) -> bool:
        body = self._buf.lstrip(WHITESPACE)
        ends = [at for m in _NAME_ENDS if (at := body.find(m)) >= 0]
        if not ends:
            name = body[: len(body) - partial_marker_length(body, _NAME_ENDS)]
            if len(name) > _MAX_NAME or any(c in name for c in _NOT_IN_NAMES):
                return self._not_a_call(out)
            return False
        name = body[: min(ends)].strip()
        if not name or len(name) > _MAX_NAME or any(c in name for c in _NOT_IN_NAMES):
            return self._not_a_call(out)
        schema = self._schemas.get(name) or {}
        self._properties = dict(schema.get("properties") or {})
        out += [ToolCallStart(name), ToolCallDelta("{")]
        self._buf, self._state = body[min(ends):], _BODY
        return True

    def _body(self, out: list[Segment]) -> bool:
        body = self._buf.lstrip(WHITESPACE)
        if body.startswith(TOOL_CALL_END):
            out += [ToolCallDelta("}"), ToolCallEnd()]
            self.done, self.rest = True, body[len(TOOL_CALL_END):]
            return False
        if body.startswith(ARG_KEY):
            self._buf, self._state = body[len(ARG_KEY):], _KEY
            return True
        if not body or any(m.startswith(body) for m in (TOOL_CALL_END, ARG_KEY)):
            return False
        return self._cut(body, out)

    def _read_key(self, out: list[Segment]) -> bool:
        at = self._buf.find(ARG_KEY_END)
        if at < 0:
            return len(self._buf) > _MAX_NAME and self._cut(self._buf, out)
        self._key = self._buf[:at].strip()
        self._buf, self._state = self._buf[at + len(ARG_KEY_END):], _BEFORE_VALUE
        return True

    def _before_value(self, out: list[Segment]) -> bool:
        body = self._buf.lstrip(WHITESPACE)
        if body.startswith(ARG_VALUE):
            self._buf, self._state = body[len(ARG_VALUE):], _VALUE
            self._start_value(out)
            return True
        if not body or ARG_VALUE.startswith(body):
            return False
        return self._cut(body, out)

    def _read_value(self, out: list[Segment]) -> bool:
        at = self._buf.find(ARG_VALUE_END)
        if at < 0:
            keep = partial_marker_length(self._buf, (ARG_VALUE_END,))
            self._add_value(self._buf[: len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        self._add_value(self._buf[:at], out)
        self._close_value(out)
        self._buf, self._state = self._buf[at + len(ARG_VALUE_END):], _BODY
        return True

    # -- values ---------------------------------------------------------------------------

    def _start_value(self, out: list[Segment]) -> None:
        key = (", " if self._params else "") + json.dumps(self._key, ensure_ascii=False) + ": "
        self._params += 1
        schema = self._properties.get(self._key)
        self._text = is_string_schema(schema)  # the value is a string, not JSON
        constrained = isinstance(schema, dict) and any(k in schema for k in _CONSTRAINED_STRING)
        self._streaming = self._text and not constrained
        self._collected = ""
        if self._streaming:
            out.append(ToolCallDelta(key + '"'))
        else:
            self._held_key = key  # written with the value, once it is complete

    def _add_value(self, text: str, out: list[Segment]) -> None:
        if not self._streaming:
            self._collected += text
        elif text:
            out.append(ToolCallDelta(json.dumps(text, ensure_ascii=False)[1:-1]))

    def _close_value(self, out: list[Segment]) -> None:
        if self._streaming:
            out.append(ToolCallDelta('"'))
        else:
            raw = self._collected.strip(WHITESPACE)
            out.append(ToolCallDelta(self._held_key + (json.dumps(raw, ensure_ascii=False) if self._text
                                                       else typed_value(raw))))
        self._collected = ""

    def _cut(self, body: str, out: list[Segment]) -> bool:
        """Unexpected text inside a call: the call ends there (closed by repair)."""
        log.warning("unexpected text in a GLM tool call; the call ends there")
        out += [ToolCallDelta("}"), ToolCallEnd(complete=False)]
        self.done, self.rest = True, body
        return False

    def _not_a_call(self, out: list[Segment]) -> bool:
        log.warning("text after %s is not a GLM call; kept as text", TOOL_CALL_START)
        out.append(TextSegment(self._raw + self._buf))
        self._buf, self.done = "", True
        return False


class GlmParser(ToolParser):
    name = "glm"
    start_markers = (TOOL_CALL_START,)

    def open_section(self, marker: str) -> ToolSection:
        return GlmSection(marker, self.schemas)
