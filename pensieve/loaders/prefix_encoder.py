"""Encode long texts that share a prefix with a recent one without re-encoding that prefix.

An agent's follow-up turn re-sends the whole conversation: the rendered prompt starts with
the previous one (a 12k-token system prompt costs ~20 ms to tokenize on a server CPU, about
half of a warm time-to-first-token). ``PrefixEncoder`` keeps the ids of the last few long
texts with *checkpoints* — (character position, tokens so far) at split points every
``PIECE`` characters — and encodes a new text as the ids of the longest shared prefix up to
a checkpoint plus the encoding of the rest.

A split point is a space that follows a non-space character. For the regex pre-tokenizers
of byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM) no pre-token spans such a
point — pieces carry a space only at their start — so BPE never merges across it and
``encode(a + b) == encode(a) + encode(b)``. ``eligible`` admits only tokenizers of that kind
(no normaliser, no added token that strips or holds whitespace), and a probe text is checked
piecewise against a whole encoding before the cache is used at all.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tokenizers import Tokenizer

PIECE = 2048  # characters between checkpoints
MIN_CHARS = 4096  # shorter texts are encoded directly
_PRETOKENIZERS = {"Sequence", "ByteLevel", "Digits", "Split"}
_PROBE = ("Hello  world!!\n\n ok 😀 x 12345 <|im_start|>user\nfoo   bar\t baz's it's "
          "\"quoted\" (paren) a.b,c;d  \n  indented   line\r\n tabs\t\tthere ÄÖü ß "
          "日本語 テキスト emoji👍🏽 end.  \n")


@dataclass(frozen=True)
class _Entry:
    text: str
    ids: list[int]
    checkpoints: list[tuple[int, int]]  # (split point or 0, number of ids before it)


def _walk(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    inner = spec.get("pretokenizers") or []
    return [spec] + [s for sub in inner for s in _walk(sub)]


def eligible(tokenizer: Tokenizer) -> bool:
    """A byte-level BPE with regex pre-tokenisation and plain added tokens.

    Reads the parts it needs, not ``tokenizer.to_str()``: serialising and parsing a 49k
    vocabulary with its merges cost ~0.15 s of a server's start-up.
    """
    if tokenizer.normalizer is not None:
        return False
    pre = tokenizer.pre_tokenizer
    parts = _walk(json.loads(pre.__getstate__()) if pre is not None else None)
    if not parts or any(p.get("type") not in _PRETOKENIZERS for p in parts):
        return False
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return False
    for tok in tokenizer.get_added_tokens_decoder().values():
        if tok.lstrip or tok.rstrip or any(c.isspace() for c in tok.content):
            return False
    return True


def split_point(text: str, at: int) -> int | None:
    """The first space at or after ``at`` that follows a non-space character."""
    b = text.find(" ", max(at, 1))
    while b != -1 and text[b - 1].isspace():
        b = text.find(" ", b + 1)
    return None if b == -1 else b


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the longest equal prefix, by comparing slices (C speed)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixEncoder:
    """``encode(text)`` through a small cache of recent long texts (thread-safe)."""

    def __init__(self, encode: Callable[[str], list[int]], size: int = 4,
                 encode_batch: Callable[[list[str]], list[list[int]]] | None = None) -> None:
        self._encode = encode
        self._encode_batch = encode_batch or (lambda texts: [encode(t) for t in texts])
        self._size = size
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self.hits = 0  # encodes that reused a prefix (for tests and logs)

    def works(self) -> bool:
        """The probe text, split at every split point, encodes as it does whole."""
        whole = self._encode(_PROBE)
        at = split_point(_PROBE, 1)
        while at is not None:
            if self._encode(_PROBE[:at]) + self._encode(_PROBE[at:]) != whole:
                return False
            at = split_point(_PROBE, at + 1)
        return True

    def encode(self, text: str) -> list[int]:
        with self._lock:
            entries = list(self._entries)
        best, shared = None, 0
        for entry in entries:
            n = _common_prefix(entry.text, text)
            if n > shared:
                best, shared = entry, n
        ids: list[int] = []
        checkpoints = [(0, 0)]
        if best is not None:  # a checkpoint's space must be shared too: c[0] < shared
            usable = [c for c in best.checkpoints if c[0] < shared]
            if usable[-1][1]:
                ids, checkpoints = best.ids[: usable[-1][1]], usable
                self.hits += 1
        start = pos = checkpoints[-1][0]
        cuts = []  # split points after start, every PIECE characters or so
        while (pos := split_point(text, pos + PIECE)) is not None:
            cuts.append(pos)
        bounds = [start, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        for cut, piece_ids in zip([*cuts, None], self._encode_batch(pieces)):  # in parallel
            ids += piece_ids
            if cut is not None:
                checkpoints.append((cut, len(ids)))
        with self._lock:
            others = [e for e in self._entries if e.text != text]
            keep = others[len(others) - self._size + 1:] if self._size > 1 else []
            self._entries = [*keep, _Entry(text, ids, checkpoints)]
        return list(ids)
