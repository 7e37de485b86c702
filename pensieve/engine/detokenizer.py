"""Token ids → text, one step at a time, never splitting a UTF-8 character.

A byte-level BPE token can hold part of a multi-byte character; decoding it alone gives
U+FFFD. We re-decode a short window of recent tokens and only release text once the window
no longer ends in a replacement character.
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, skip_ids: frozenset[int] = frozenset()) -> None:
        self._tok = tokenizer
        self._skip = skip_ids  # ids never shown (end-of-turn tokens)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context that makes the next decode right
        self._read_offset = 0  # tokens already turned into released text

    def add(self, token_id: int) -> str:
        """Add one token; return the newly complete text (maybe empty)."""
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        if full.endswith(REPLACEMENT) or len(full) <= len(prefix):
            return ""  # incomplete character: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (a truly invalid byte sequence) at the end."""
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
