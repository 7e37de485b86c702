"""Build a ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` metadata.

Three vocab kinds, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``gpt2``: byte-level BPE from ``tokens`` + ``merges``; ``tokenizer.ggml.pre`` names the
  pre-tokenizer split (``PRE_TOKENIZERS`` below, the regexes llama.cpp uses).
- ``gemma4``: BPE from ``tokens`` + ``merges`` over raw UTF-8 with ``▁`` for spaces and
  ``<0xNN>`` byte fallback.
- ``llama``: SentencePiece BPE (Llama 2, Mistral, TinyLlama …) from ``tokens`` +
  ``scores``: a piece merges whenever it is in the vocab, higher score first, with
  ``▁`` for spaces and ``<0xNN>`` byte fallback. The merge list is derived from the
  vocab: every split of a piece into two vocab pieces, ordered by the piece's score.

CONTROL and UNKNOWN tokens become special added tokens and USER_DEFINED ones plain added
tokens, so both are matched whole when written in text.
``tests/unit/test_tokenizer_vectors.py`` checks every kind against llama.cpp's vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers as pre

from pensieve.loaders.checkpoint import CheckpointError

log = logging.getLogger(__name__)

# Pre-tokenizer regexes as llama.cpp applies them (llama-vocab.cpp, per ``pre`` name).
# Case-insensitive contractions are spelled out because llama.cpp's regex engine lacks (?i:).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 keeps combining marks (\p{M}) inside words: Khmer, Devanagari … split less
_QWEN35_SPLIT = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_CODER_SPLITS = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")
# DeepSeek-LLM's letter class is the cased letters (upper, lower, title) of its vocab's
# scripts; its punctuation class is ASCII and full-width punctuation plus CJK quotes.
_DEEPSEEK_LLM_SPLITS = (
    "[\r\n]",
    r"\s?[\p{Lu}\p{Ll}\p{Lt}]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK,
    r"\p{N}+",
)
_FALCON_SPLITS = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]")
# o200k (gpt-oss, GPT-4o; llama.cpp's ``gpt-4o``): cased word pieces with an optional
# contraction, numbers of up to 3 digits, punctuation runs keeping a trailing newline or ``/``.
# tokenizers' Oniguruma engine takes the tokenizer.json original ((?i:...)), which llama.cpp
# rewrites with lookaheads for its own engine.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Gemma 4's BPE runs on raw UTF-8 with spaces as ▁; only newline runs are cut apart
_GEMMA4_SPLIT = r"[^\n]+|[\n]+"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How a byte-level vocab splits text before BPE.

    ``splits``: regexes applied one after another, each to every piece the previous ones
    left; matches and the gaps between them both become pieces (llama.cpp's
    ``unicode_regex_split``). Empty: GPT-2's built-in regex. ``digits``: split every digit
    on its own first; ``ignore_merges``: a word that is already a vocab entry is emitted
    whole (llama.cpp does this for Llama 3).
    """

    splits: tuple[str, ...] = ()
    digits: bool = False
    ignore_merges: bool = False


_LLAMA3 = PreTokenizerSpec(splits=(_LLAMA3_SPLIT,), ignore_merges=True)
_QWEN2 = PreTokenizerSpec(splits=(_QWEN2_SPLIT,))
_DIGITS_THEN_GPT2 = PreTokenizerSpec(digits=True)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": PreTokenizerSpec(),
    "gpt2": PreTokenizerSpec(),
    "gpt-2": PreTokenizerSpec(),
    "mpt": PreTokenizerSpec(),
    "olmo": PreTokenizerSpec(),
    "phi-2": PreTokenizerSpec(),
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "falcon3": _LLAMA3,
    "pixtral": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "stablelm2": _QWEN2,
    "qwen35": PreTokenizerSpec(splits=(_QWEN35_SPLIT,)),
    "gpt-4o": PreTokenizerSpec(splits=(_GPT4O_SPLIT,)),
    "deepseek-coder": PreTokenizerSpec(splits=_DEEPSEEK_CODER_SPLITS),
    "deepseek-llm": PreTokenizerSpec(splits=_DEEPSEEK_LLM_SPLITS),
    "falcon": PreTokenizerSpec(splits=_FALCON_SPLITS),
}


@dataclass(frozen=True)
class GGUFVocab:
    """A built tokenizer plus the BOS/EOS facts the GGUF declares."""

    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    add_bos: bool
    extra_eos_ids: tuple[int, ...]


def build_gguf_vocab(meta: Mapping[str, Any]) -> GGUFVocab:
    """Turn ``tokenizer.ggml.*`` metadata into a tokenizer; CheckpointError if unusable."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError("GGUF has no tokenizer.ggml.tokens: cannot build a tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError("GGUF token_type and tokens have different lengths")
    if kind == "gpt2":
        tok = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [],
                              str(meta.get("tokenizer.ggml.pre", "default")))
    elif kind == "llama":
        tok = _sentencepiece_bpe(tokens, types, meta)
    elif kind == "gemma4":
        tok = _escaped_space_bpe(tokens, meta.get("tokenizer.ggml.merges") or [])
    else:
        raise CheckpointError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (BPE), "
            "'llama' (SPM), 'gemma4' (BPE over ▁-escaped text)"
        )
    _add_special_tokens(tok, tokens, types)

    def token_at(key: str) -> str | None:
        idx = meta.get(key)
        return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

    extra = tuple(meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                  if isinstance(meta.get(k), int))
    return GGUFVocab(
        tokenizer=tok,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=token_at("tokenizer.ggml.eos_token_id"),
        # llama.cpp forces BOS on for Gemma 4 whatever the file says
        add_bos=kind == "gemma4" or bool(meta.get("tokenizer.ggml.add_bos_token",
                                                  kind == "llama")),
        extra_eos_ids=extra,
    )


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, piece in enumerate(tokens):
        vocab.setdefault(piece, i)  # first id wins if a GGUF repeats a piece
    return vocab


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    """``"left right"`` strings → pairs; the cut is the first space after the first
    character, so a left part that is itself a space survives (as llama.cpp reads them)."""
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise CheckpointError(f"malformed GGUF merge {m!r} (expected 'left right')")
        pairs.append((m[:cut], m[cut + 1:]))
    return pairs


def _byte_level_bpe(tokens: list[str], merges: list[str], pre_name: str) -> Tokenizer:
    spec = PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        log.warning("unknown tokenizer.ggml.pre %r: using GPT-2 byte-level splitting", pre_name)
        spec = PRE_TOKENIZERS["default"]
    tok = Tokenizer(models.BPE(_vocab_dict(tokens), _merge_pairs(merges),
                               ignore_merges=spec.ignore_merges))
    steps: list[Any] = []
    if spec.digits:
        steps.append(pre.Digits(individual_digits=True))
    steps += [pre.Split(Regex(r), behavior="isolated", invert=False) for r in spec.splits]
    steps.append(pre.ByteLevel(add_prefix_space=False, use_regex=not spec.splits))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _escaped_space_bpe(tokens: list[str], merges: list[str]) -> Tokenizer:
    """Gemma 4: BPE with merges over raw UTF-8 where spaces are ``▁``, ``<0xNN>`` byte
    fallback, no space prefix; newline runs are pieces of their own."""
    tok = Tokenizer(models.BPE(_vocab_dict(tokens), _merge_pairs(merges), byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre.Split(Regex(_GEMMA4_SPLIT), behavior="isolated", invert=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: Mapping[str, Any]) -> Tokenizer:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise CheckpointError("SentencePiece GGUF vocab needs one tokenizer.ggml.scores per token")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    merges = _spm_merges(tokens, types, scores)
    tok = Tokenizer(models.BPE(_vocab_dict(tokens), merges, unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp prefixes a space to every text fragment that follows a special token
    # or starts the prompt; normalizing per fragment does exactly that
    norm = [normalizers.Replace(" ", "▁")]
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        norm.insert(0, normalizers.Prepend("▁"))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    return tok


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, best-scored piece first."""
    normal = {p: i for i, p in enumerate(tokens) if types[i] == TokenType.NORMAL}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            li, ri = normal.get(left), normal.get(right)
            if li is not None and ri is not None:
                found.append((-scores[i], li, ri, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types)
               if t in (TokenType.CONTROL, TokenType.UNKNOWN) and tokens[i]]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TokenType.USER_DEFINED and tokens[i]]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
