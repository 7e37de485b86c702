"""Qwen3-Coder XML format: arguments as tagged parameters, values as raw text::

    <tool_call>
    <function=Bash>
    <parameter=command>
    ls -la
    </parameter>
    </function>
    </tool_call>

The arguments stream as JSON we write: a parameter the tool's schema types as a string
streams as a JSON string while it is generated; other values are parsed as JSON when
complete (falling back to a string). One newline around each value is the format's own.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pensieve.chat.segments import Segment, TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_parsers.base import Schemas, ToolParser, ToolSection, partial_marker_length
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE

log = logging.getLogger(__name__)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"
_VALUE_ENDS = (PARAMETER_END, FUNCTION_END)
_MAX_NAME = 256

_HEAD, _BODY, _VALUE, _TAIL = range(4)


class Qwen3CoderSection(ToolSection):
    def __init__(self, marker: str, schemas: Schemas) -> None:
        super().__init__()
        self._schemas = schemas
        self._raw = marker  # text before the call started, for the fallback
        self._buf = ""
        self._state = _HEAD
        self._properties: dict[str, Any] = {}
        self._params = 0
        self._param = ""
        self._streaming = False  # the current value streams as a JSON string
        self._value_begun = False
        self._pending = ""  # value text held back: a trailing newline, a partial end tag
        self._collected = ""  # a non-string value's text, parsed when complete
        self._key = ""  # a non-string value's '"name": ', written with the value

    def feed(self, text: str) -> list[Segment]:
        self._buf += text
        out: list[Segment] = []
        progressed = True
        while progressed and not self.done:
            progressed = (self._head, self._body, self._read_value, self._tail)[self._state](out)
        return out

    def finish(self) -> list[Segment]:
        if self.done:
            return []
        if self._state == _HEAD:
            return [TextSegment(self._raw + self._buf)] if (self._raw + self._buf).strip() else []
        out: list[Segment] = []
        if self._state == _VALUE:
            self._add_value(self._pending + self._buf, out)
            self._close_value(out)
        if self._state in (_BODY, _VALUE):
            out += [ToolCallDelta("}"), ToolCallEnd(complete=False)]
        self.done = True
        return out

    # -- states: each returns whether it made progress ------------------------------------

    def _head(self, out: list[Segment]) -> bool:
        body = self._buf.lstrip(WHITESPACE)
        if not body or FUNCTION.startswith(body):
            return False
        close = body.find(">")
        if not body.startswith(FUNCTION) or (close < 0 and len(body) > _MAX_NAME):
            return self._not_a_call(out)
        if close < 0:
            return False
        name = body[len(FUNCTION):close].strip()
        if not name or "\n" in name:
            return self._not_a_call(out)
        schema = self._schemas.get(name) or {}
        self._properties = dict(schema.get("properties") or {})
        out += [ToolCallStart(name), ToolCallDelta("{")]
        self._buf, self._state = body[close + 1:], _BODY
        return True

    def _body(self, out: list[Segment]) -> bool:
        body = self._buf.lstrip(WHITESPACE)
        if body.startswith(FUNCTION_END):
            out += [ToolCallDelta("}"), ToolCallEnd()]
            self._buf, self._state = body[len(FUNCTION_END):], _TAIL
            return True
        if body.startswith(PARAMETER) and ">" in body:
            close = body.index(">")
            self._param = body[len(PARAMETER):close].strip()
            self._buf, self._state, self._value_begun = body[close + 1:], _VALUE, False
            self._start_value(out)
            return True
        if not body or any(m.startswith(body) for m in (FUNCTION_END, PARAMETER)):
            return False
        if body.startswith(PARAMETER) and len(body) <= _MAX_NAME:
            return False  # the parameter's name is still coming
        log.warning("unexpected text in a qwen3-coder tool call; the call ends there")
        out += [ToolCallDelta("}"), ToolCallEnd(complete=False)]
        self.done, self.rest = True, body
        return False

    def _read_value(self, out: list[Segment]) -> bool:
        text, self._buf, self._pending = self._pending + self._buf, "", ""
        if not self._value_begun and text:
            self._value_begun = True
            text = text.removeprefix("\n")
        end = min((at for m in _VALUE_ENDS if (at := text.find(m)) >= 0), default=-1)
        if end < 0:
            keep = partial_marker_length(text, _VALUE_ENDS)
            ready, held = text[: len(text) - keep], text[len(text) - keep:]
            if ready.endswith("\n"):
                ready, held = ready[:-1], "\n" + held
            self._add_value(ready, out)
            self._pending = held
            return False
        self._add_value(text[:end].removesuffix("\n"), out)
        self._close_value(out)
        self._buf = text[end:].removeprefix(PARAMETER_END)
        self._state = _BODY
        return True

    def _tail(self, out: list[Segment]) -> bool:
        body = self._buf.lstrip(WHITESPACE)
        if TOOL_CALL_END.startswith(body) and len(body) < len(TOOL_CALL_END):
            return False
        self.done = True
        self.rest = body[len(TOOL_CALL_END):] if body.startswith(TOOL_CALL_END) else self._buf
        return False

    # -- values ---------------------------------------------------------------------------

    def _start_value(self, out: list[Segment]) -> None:
        key = (", " if self._params else "") + json.dumps(self._param, ensure_ascii=False) + ": "
        self._params += 1
        self._streaming = is_string_schema(self._properties.get(self._param))
        self._collected = ""
        if self._streaming:
            out.append(ToolCallDelta(key + '"'))
        else:
            self._key = key

    def _add_value(self, text: str, out: list[Segment]) -> None:
        if not self._streaming:
            self._collected += text
        elif text:
            out.append(ToolCallDelta(json.dumps(text, ensure_ascii=False)[1:-1]))

    def _close_value(self, out: list[Segment]) -> None:
        if self._streaming:
            out.append(ToolCallDelta('"'))
        else:
            out.append(ToolCallDelta(self._key + typed_value(self._collected)))
        self._collected = ""

    def _not_a_call(self, out: list[Segment]) -> bool:
        log.warning("text after %s is not a qwen3-coder call; kept as text", TOOL_CALL_START)
        out.append(TextSegment(self._raw + self._buf))
        self._buf, self.done = "", True
        return False


def is_string_schema(schema: Any) -> bool:
    """Does the parameter stream as a string? (untyped or unknown parameters do)."""
    if not isinstance(schema, dict):
        return True
    kind = schema.get("type")
    if kind is None:
        return not any(k in schema for k in ("anyOf", "oneOf", "enum", "properties", "items"))
    return kind == "string" or isinstance(kind, list) and "string" in kind


def typed_value(raw: str) -> str:
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False)
    except ValueError:
        return json.dumps(raw, ensure_ascii=False)


class Qwen3CoderParser(ToolParser):
    name = "qwen3_coder"
    start_markers = (TOOL_CALL_START,)

    def open_section(self, marker: str) -> ToolSection:
        return Qwen3CoderSection(marker, self.schemas)
