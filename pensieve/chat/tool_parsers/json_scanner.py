"""An incremental JSON scanner: validates one JSON value as its characters arrive.

It re-emits what it reads so that the output *so far* plus ``closing()`` is always valid
JSON — which is what streaming tool arguments needs (``input_json_delta`` pieces whose
concatenation is the final arguments, parseable as a prefix at every step):

- a comma, the key that follows it and the colon are held back until the member's value
  starts, so a cut never leaves a dangling ``,`` or ``"key":``;
- escape sequences are held back until complete, and a UTF-16 surrogate escape until its
  pair arrives (a lone one becomes ``\\ufffd``, which strict parsers accept);
- a raw control character inside a string (models write literal newlines) is escaped, and
  an invalid escape (``\\x``, ``\\u12G4``) is read as a literal backslash: a string can only end
  at its closing quote, so a value that streamed is never cut short by a syntax error.
"""

from __future__ import annotations

import re

WHITESPACE = " \t\n\r"
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?)?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')
_HEX = frozenset("0123456789abcdefABCDEF")
_CONTROL_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}
_LONE_SURROGATE = "\\ufffd"

# Container states: what the next non-space character may be.
_KEY_OR_END = "key_or_end"  # after "{"
_KEY = "key"  # after "," in an object
_COLON = "colon"
_VALUE = "value"  # after ":" or after "," in an array
_VALUE_OR_END = "value_or_end"  # after "["
_COMMA_OR_END = "comma_or_end"


class JsonSyntaxError(ValueError):
    """The text cannot continue a valid JSON value; ``consumed`` characters of the last
    ``feed`` were valid."""

    def __init__(self, message: str, consumed: int) -> None:
        super().__init__(message)
        self.consumed = consumed


class JsonScanner:
    """Reads one JSON value; ``done`` once it is complete. Not thread-safe."""

    def __init__(self) -> None:
        self._stack: list[list[str]] = []  # [kind ("{" or "["), state] per open container
        self._scalar: str | None = None  # "string", "key", "number" or "literal" in progress
        self._buf = ""  # number text, or the literal's letters so far
        self._word = ""  # the literal being read
        self._escape = ""  # an escape sequence not yet complete
        self._high = ""  # a high-surrogate escape waiting for its pair
        self._holding = False  # output goes to _held until the next value starts
        self._held = ""
        self._out: list[str] = []
        self.started = False
        self.done = False

    # -- public ---------------------------------------------------------------------------

    def feed(self, text: str) -> int:
        """Read ``text`` up to the end of the value; returns how many characters were used.
        Raises ``JsonSyntaxError`` at the first character that cannot continue the value."""
        for i, ch in enumerate(text):
            if self.done:
                return i
            try:
                used = self._char(ch)
            except JsonSyntaxError as exc:
                raise JsonSyntaxError(str(exc), i) from None
            if not used:
                return i
        return len(text)

    def end(self) -> bool:
        """The text is over: completes a top-level number. True when the value is complete."""
        if self._scalar == "number" and not self._stack and _NUMBER.fullmatch(self._buf):
            self._scalar = None
            self.done = True
        return self.done

    def take(self) -> str:
        """The output produced since the last call."""
        out = "".join(self._out)
        self._out.clear()
        return out

    def closing(self) -> str:
        """What to append to the output so far to make it a complete JSON value."""
        parts: list[str] = []
        if self._scalar == "string":
            parts.append('"')
        elif self._scalar == "number" and not _NUMBER.fullmatch(self._buf):
            parts.append("0")
        elif self._scalar == "literal":
            parts.append(self._word[len(self._buf):])
        for kind, _ in reversed(self._stack):
            parts.append("}" if kind == "{" else "]")
        return "".join(parts)

    # -- characters -----------------------------------------------------------------------

    def _char(self, ch: str) -> bool:
        if self._scalar in ("string", "key"):
            self._string_char(ch)
            return True
        if self._scalar == "literal":
            if ch != self._word[len(self._buf)]:
                raise JsonSyntaxError(f"invalid literal: {self._buf + ch!r}", 0)
            self._buf += ch
            self._emit(ch)
            if self._buf == self._word:
                self._scalar = None
                self._value_done()
            return True
        if self._scalar == "number":
            if _NUMBER_PREFIX.fullmatch(self._buf + ch):
                self._buf += ch
                self._emit(ch)
                return True
            if not _NUMBER.fullmatch(self._buf):
                raise JsonSyntaxError(f"invalid number: {self._buf + ch!r}", 0)
            self._scalar = None
            self._value_done()
            if self.done:
                return False
        return self._structural(ch)

    def _structural(self, ch: str) -> bool:
        if ch in WHITESPACE:
            if self.started:
                self._emit(ch)
            return True
        state = self._stack[-1][1] if self._stack else (_VALUE if not self.started else "")
        if state in (_VALUE, _VALUE_OR_END) and not (ch == "]" and state == _VALUE_OR_END):
            self._start_value(ch)
        elif state in (_KEY_OR_END, _KEY) and ch == '"':
            self._holding = True
            self._scalar = "key"
            self._emit(ch)
        elif state == _COLON and ch == ":":
            self._stack[-1][1] = _VALUE
            self._emit(ch)
        elif state == _COMMA_OR_END and ch == ",":
            self._stack[-1][1] = _KEY if self._stack[-1][0] == "{" else _VALUE
            self._holding = True
            self._emit(ch)
        elif ch in "}]" and self._closes(state, ch):
            self._stack.pop()
            self._emit(ch)
            self._value_done()
        else:
            raise JsonSyntaxError(f"unexpected {ch!r}", 0)
        return True

    def _closes(self, state: str, ch: str) -> bool:
        kind = self._stack[-1][0] if self._stack else ""
        if ch == "}":
            return kind == "{" and state in (_KEY_OR_END, _COMMA_OR_END)
        return kind == "[" and state in (_VALUE_OR_END, _COMMA_OR_END)

    def _start_value(self, ch: str) -> None:
        if ch == "{":
            self._stack.append(["{", _KEY_OR_END])
        elif ch == "[":
            self._stack.append(["[", _VALUE_OR_END])
        elif ch == '"':
            self._scalar = "string"
        elif ch == "-" or ch.isdigit() and ch.isascii():
            self._scalar, self._buf = "number", ch
        elif ch in _LITERALS:
            self._scalar, self._word, self._buf = "literal", _LITERALS[ch], ch
        else:
            raise JsonSyntaxError(f"unexpected {ch!r} where a value should start", 0)
        self.started = True
        if self._holding:
            self._out.append(self._held)
            self._held, self._holding = "", False
        self._emit(ch)

    def _value_done(self) -> None:
        if not self._stack:
            self.done = True
        else:
            self._stack[-1][1] = _COMMA_OR_END

    # -- strings --------------------------------------------------------------------------

    def _string_char(self, ch: str) -> None:
        if self._escape:
            self._escape_char(ch)
        elif ch == "\\":
            self._escape = ch
        else:
            self._flush_high()
            if ch == '"':
                self._emit(ch)
                if self._scalar == "key":
                    self._stack[-1][1] = _COLON
                    self._scalar = None
                else:
                    self._scalar = None
                    self._value_done()
            elif ch < " ":
                self._emit(_CONTROL_ESCAPES.get(ch) or f"\\u{ord(ch):04x}")
            else:
                self._emit(ch)

    def _escape_char(self, ch: str) -> None:
        self._escape += ch
        if len(self._escape) == 2:
            if ch == "u":
                return
            self._flush_high()
            if ch in _SIMPLE_ESCAPES:
                self._emit(self._escape)
                self._escape = ""
            else:
                self._invalid_escape()
            return
        if ch not in _HEX:
            self._flush_high()
            self._invalid_escape()
            return
        if len(self._escape) == 6:
            escape, self._escape = self._escape, ""
            self._unicode_escape(escape)

    def _invalid_escape(self) -> None:
        """``\\`` + what followed it, read as text: a backslash, then the characters again."""
        rest, self._escape = self._escape[1:], ""
        self._emit("\\\\")
        for ch in rest:
            self._string_char(ch)

    def _unicode_escape(self, escape: str) -> None:
        code = int(escape[2:], 16)
        if 0xD800 <= code < 0xDC00:  # high surrogate: wait for its pair
            self._flush_high()
            self._high = escape
        elif 0xDC00 <= code < 0xE000:  # low surrogate: valid only right after a high one
            self._emit(self._high + escape if self._high else _LONE_SURROGATE)
            self._high = ""
        else:
            self._flush_high()
            self._emit(escape)

    def _flush_high(self) -> None:
        if self._high:
            self._emit(_LONE_SURROGATE)
            self._high = ""

    def _emit(self, text: str) -> None:
        if self._holding:
            self._held += text
        else:
            self._out.append(text)
