"""Text ⇄ token ids, over a ``tokenizers.Tokenizer`` built from GGUF metadata or tokenizer.json.

Invariants: ``encode`` parses special tokens written in the text (``<|im_start|>`` → its
one id) and never adds BOS — chat templates write BOS themselves, ``add_bos`` says
whether a raw prompt should start with it. ``decode`` keeps special tokens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from pensieve.loaders.prefix_encoder import MIN_CHARS as PREFIX_MIN_CHARS
from pensieve.loaders.prefix_encoder import PrefixEncoder, eligible as prefix_eligible

# End-of-turn markers of common chat formats: generation stops on any that the vocab has.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<|end_of_text|>", "<|return|>", "<|call|>",
)
# harmony (gpt-oss): <|end|> closes a message, not the turn — <|return|> and <|call|> do. As
# llama.cpp does, a vocabulary with both of those does not end a turn on <|end|>.
HARMONY_TURN_ENDS = ("<|return|>", "<|call|>")
HARMONY_MESSAGE_END = "<|end|>"


class TextTokenizer:
    """A model's tokenizer with its BOS/EOS facts.

    ``eos_token_ids`` holds every id that ends a turn: the declared EOS, the extra ids a
    checkpoint declares (``generation_config.json``), and ``END_OF_TURN_TOKENS`` present
    in the vocabulary (a harmony vocabulary's ``<|end|>`` excepted).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.add_bos = add_bos and self.bos_token_id is not None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        ends = {tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS}
        ends |= {eos_id, *extra_eos_ids}
        if all(tokenizer.token_to_id(t) is not None for t in HARMONY_TURN_ENDS):
            ends.discard(tokenizer.token_to_id(HARMONY_MESSAGE_END))
        self.eos_token_ids: frozenset[int] = frozenset(
            i for i in ends if i is not None and 0 <= i < self.vocab_size
        )
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        # the control tokens' strings: request text that spells one must stay text
        self.special_tokens: tuple[str, ...] = tuple(
            tok.content for tok in added.values() if tok.special and tok.content)
        self._max_token_chars: int | None = None
        self._text_tok: Tokenizer | None = None  # specials read as text (built on first use)
        self._text_lock = threading.Lock()
        self._prefix: PrefixEncoder | None = None
        if prefix_eligible(tokenizer):
            prefix = PrefixEncoder(self._encode_plain, encode_batch=self._encode_pieces)
            self._prefix = prefix if prefix.works() else None

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary piece: no token spells more text than this
        (byte-level pieces write one character per byte), so ``len(text) // max_token_chars``
        bounds a text's token count from below without encoding it."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(p) for p in self._tok.get_vocab(with_added_tokens=True)),
                                        default=1)
        return self._max_token_chars

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for grammar engines that need it)."""
        return self._tok

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Ids of ``text``; specials written in it are parsed (``special=False``: read as
        plain text); no BOS is added. A long text that starts like a recent one reuses that
        one's ids (``prefix_encoder.py``)."""
        if not special:
            return self._specials_as_text().encode(text, add_special_tokens=False).ids
        if self._prefix is not None and len(text) >= PREFIX_MIN_CHARS:
            return self._prefix.encode(text)
        return self._encode_plain(text)

    def _specials_as_text(self) -> Tokenizer:
        """A copy of the tokenizer that encodes special-token strings as text (the flag is
        per tokenizer, and encodes run on several threads: the shared one is never flipped)."""
        with self._text_lock:
            if self._text_tok is None:
                plain = Tokenizer.from_str(self._tok.to_str())
                plain.encode_special_tokens = True
                self._text_tok = plain
            return self._text_tok

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once: ``tokenizers`` encodes a batch on all cores."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens kept."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry for ``token_id`` as stored (e.g. ``Ġhello``, ``▁the``)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} outside vocabulary of {self.vocab_size}")
        return piece

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (``<|im_start|>``, ``<s>`` …), never for text pieces."""
        return token_id in self._special_ids

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> TextTokenizer:
        """Build from a GGUF file's ``tokenizer.ggml.*`` keys (CheckpointError if unusable)."""
        # deferred: gguf_vocab imports checkpoint, which imports this module
        from pensieve.loaders.gguf_vocab import build_gguf_vocab

        vocab = build_gguf_vocab(metadata)
        return cls(vocab.tokenizer, bos_token=vocab.bos_token, eos_token=vocab.eos_token,
                   add_bos=vocab.add_bos, extra_eos_ids=vocab.extra_eos_ids)

    @classmethod
    def from_tokenizer_json(cls, folder: str | Path) -> TextTokenizer:
        """Load an HF folder's tokenizer.json with tokenizer_config.json's BOS/EOS facts."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast tokenizers load)")
        tok = Tokenizer.from_file(str(path))
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        bos = _token_text(config.get("bos_token", special_map.get("bos_token")))
        eos = _token_text(config.get("eos_token", special_map.get("eos_token")))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(tok, bos)
        return cls(tok, bos_token=bos, eos_token=eos, add_bos=bool(add_bos),
                   extra_eos_ids=_declared_eos_ids(folder))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_adds(tok: Tokenizer, bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor prepends BOS (older folders say it only there)."""
    if bos is None or tok.token_to_id(bos) is None:
        return False
    ids = tok.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == tok.token_to_id(bos)


def _declared_eos_ids(folder: Path) -> list[int]:
    """eos_token_id from generation_config.json and config.json (an int or a list)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(folder / name).get("eos_token_id")
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(v for v in value if isinstance(v, int))
    return ids
