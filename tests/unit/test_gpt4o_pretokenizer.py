"""gpt-oss's o200k pre-tokenizer (``tokenizer.ggml.pre = "gpt-4o"``): the pieces our byte-level
BPE splits text into equal those of the tokenizer.json regex (as quoted in llama.cpp's
``llama-vocab.cpp``) under the ``regex`` module, and, on ASCII text, those of llama.cpp's own
lookahead formulation (which approximates the cased classes by ``[^a-z]``/``[^A-Z]``)."""

from __future__ import annotations

import pytest
from tokenizers import Regex
from tokenizers import pre_tokenizers as pre

from pensieve.loaders.gguf_vocab import PRE_TOKENIZERS

regex = pytest.importorskip("regex")

ORIGINAL = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
LLAMA_CPP = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + CONTRACTION
    + r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + CONTRACTION
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "Hello world, it's GPT-4o's HTTPServer! I'LL see you'Re fine.",
    "numbers 1234567 and 3.14159; x=42//7\n\n  indented\tline\r\nend",
    "camelCaseWord XMLHttpRequest déjà-vu ÉCOLE naïve 東京タワー Привет мир",
    "path/to/file.py:12 -> {'key': [1, 2]} /* c */ ... !!!\n",
    "   leading spaces and trailing   ",
]


def pieces(text: str) -> list[str]:
    split = pre.Split(Regex(PRE_TOKENIZERS["gpt-4o"].splits[0]), behavior="isolated")
    return [piece for piece, _ in split.pre_tokenize_str(text)]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_equal_the_tokenizer_json_regex(text):
    ours = pieces(text)
    assert ours == [m.group(0) for m in regex.finditer(ORIGINAL, text)]
    assert "".join(ours) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if t.isascii()])
def test_ascii_pieces_equal_llama_cpp_regex(text):
    assert pieces(text) == [m.group(0) for m in regex.finditer(LLAMA_CPP, text)]


def test_cased_words_and_numbers_split_as_o200k_does():
    assert pieces("XMLHttpRequest it's 12345") == ["XMLHttp", "Request", " it's", " ", "123", "45"]
