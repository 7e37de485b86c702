"""Reads one ``{"name": "…", "arguments": {…}}`` object from a stream of text.

Shared by the JSON formats (Hermes/Qwen, Llama 3.x, Mistral's array form). The object's
members are read one by one; the arguments object streams as ``ToolCallDelta``s through a
``JsonScanner`` as soon as the name is known (models write the name first). Arguments that
come before the name are held until the object ends; arguments written as a JSON *string*
(some models do) are decoded once complete. ``parameters`` and ``input`` are accepted as
other names of ``arguments``.

Until ``ToolCallStart`` is out, the reader can still fail without consequence (the caller
turns the raw text back into text). After it, a failure closes the arguments by repair and
ends the call with ``ToolCallEnd(complete=False)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection

from pensieve.chat.segments import Segment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_parsers.json_scanner import WHITESPACE, JsonScanner, JsonSyntaxError

log = logging.getLogger(__name__)

ARGUMENT_KEYS = ("arguments", "parameters", "input")

_OPEN, _KEY_OR_END, _KEY, _COLON, _VALUE, _IN_KEY, _IN_VALUE, _AFTER, _DONE = range(9)


class CallReadError(ValueError):
    """The object is not a tool call (or not valid JSON); ``consumed`` characters of the
    last ``feed`` were read before the problem, making ``segments``."""

    def __init__(self, message: str, consumed: int, segments: list[Segment] | None = None) -> None:
        super().__init__(message)
        self.consumed = consumed
        self.segments = segments or []


class JsonCallReader:
    """One call object. ``name_first``: fail as soon as the first key is not ``name`` (for
    formats where a bare JSON object may just be an answer). ``known_names``: fail when the
    name is not one of them (for drift formats, where an object that names no offered tool
    is data, not a call)."""

    def __init__(self, *, name_first: bool = False, known_names: Collection[str] | None = None) -> None:
        self.name_first = name_first
        self.known_names = known_names
        self.name: str | None = None
        self.started = False  # ToolCallStart emitted
        self.done = False
        self._state = _OPEN
        self._scanner: JsonScanner | None = None
        self._key = ""
        self._member = ""  # the key whose value is being read
        self._raw: list[str] = []  # the value's output so far (name, buffered arguments)
        self._args: str | None = None  # complete arguments JSON not yet emitted
        self._has_args = False

    def feed(self, text: str) -> tuple[list[Segment], int]:
        """Segments for ``text`` and how many characters it used (all of them unless the
        object ended). Raises ``CallReadError``, which carries the segments made before."""
        out: list[Segment] = []
        i = 0
        while i < len(text) and not self.done:
            try:
                i += self._step(text, i, out)
            except (JsonSyntaxError, CallReadError) as exc:
                raise CallReadError(str(exc), i + exc.consumed, out) from None
        return out, i

    def finish(self) -> list[Segment]:
        """The text ended inside the object: close what streamed, if anything did."""
        if not self.started:
            raise CallReadError("tool call cut short", 0)
        out: list[Segment] = []
        streaming = self._state == _IN_VALUE and self._member == "arguments"
        if streaming and self._scanner is not None:
            rest = self._scanner.take() + self._scanner.closing()
            if rest:
                out.append(ToolCallDelta(rest))
        out.append(ToolCallEnd(complete=not streaming))
        self.done = True
        return out

    # -- one step: returns the number of characters used ----------------------------------

    def _step(self, text: str, i: int, out: list[Segment]) -> int:
        ch = text[i]
        if self._state in (_IN_KEY, _IN_VALUE):
            return self._scan(text, i, out)
        if ch in WHITESPACE:
            return 1
        if self._state == _OPEN and ch == "{":
            self._state = _KEY_OR_END
        elif self._state in (_KEY_OR_END, _KEY) and ch == '"':
            self._scanner, self._state = JsonScanner(), _IN_KEY
            return 0  # the scanner reads the opening quote
        elif self._state == _COLON and ch == ":":
            self._state = _VALUE
        elif self._state == _VALUE:
            self._start_value(ch, out)
            return 0
        elif self._state == _AFTER and ch == ",":
            self._state = _KEY
        elif self._state in (_AFTER, _KEY_OR_END) and ch == "}":
            self._end(out)
        else:
            raise CallReadError(f"unexpected {ch!r} in a tool call object", 0)
        return 1

    def _scan(self, text: str, i: int, out: list[Segment]) -> int:
        assert self._scanner is not None
        used = self._scanner.feed(text[i:])
        piece = self._scanner.take()
        if self._state == _IN_KEY:
            self._raw.append(piece)
            if self._scanner.done:
                self._key = json.loads("".join(self._raw))
                self._raw.clear()
                if self.name_first and self.name is None and self._key != "name":
                    raise CallReadError(f"first key is {self._key!r}, not 'name'", used)
                self._state = _COLON
        elif self._member == "arguments" and self.started:
            if piece:
                out.append(ToolCallDelta(piece))
        elif self._member:
            self._raw.append(piece)
        if self._state == _IN_VALUE and self._scanner.done:
            self._value_done()
        return used

    def _start_value(self, ch: str, out: list[Segment]) -> None:
        key = self._key
        if key == "name" and self.name is None:
            self._member = "name"
        elif key in ARGUMENT_KEYS and not self._has_args:
            if ch not in '{"':
                raise CallReadError(f"tool arguments must be an object, not {ch!r}…", 0)
            self._member = "arguments"
            self._has_args = True
            if ch == "{" and self.name is not None:
                self._start(out)
            elif ch == '"':
                self._member = "arguments_string"
        else:
            self._member = ""  # another key: read and ignore
        self._scanner, self._state = JsonScanner(), _IN_VALUE

    def _value_done(self) -> None:
        raw = "".join(self._raw)
        self._raw.clear()
        if self._member == "name":
            name = json.loads(raw)
            if not isinstance(name, str) or not name:
                raise CallReadError(f"tool name is not a string: {raw}", 0)
            if self.known_names is not None and name not in self.known_names:
                raise CallReadError(f"{name!r} is not an offered tool", 0)
            self.name = name
        elif self._member == "arguments" and not self.started:
            self._args = raw
        elif self._member == "arguments_string":
            self._args = _decode_string_arguments(raw)
        self._member, self._scanner, self._state = "", None, _AFTER

    def _start(self, out: list[Segment]) -> None:
        assert self.name is not None
        out.append(ToolCallStart(self.name))
        self.started = True

    def _end(self, out: list[Segment]) -> None:
        if self.name is None:
            raise CallReadError("tool call object has no name", 0)
        if not self.started:
            self._start(out)
        if self._args is not None and self._args != "{}":
            out.append(ToolCallDelta(self._args))
        self._args = None
        out.append(ToolCallEnd(complete=True))
        self.done = True
        self._state = _DONE


def _decode_string_arguments(raw: str) -> str:
    """``"{\\"a\\": 1}"`` → ``{"a": 1}`` (as JSON text), or ``CallReadError``."""
    try:
        value = json.loads(json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise CallReadError(f"tool arguments string is not JSON: {exc}", 0) from None
    if not isinstance(value, dict):
        raise CallReadError("tool arguments are not an object", 0)
    return json.dumps(value, ensure_ascii=False)
