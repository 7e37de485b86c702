"""PrefixEncoder: a long text that starts like a recent one reuses its ids, exactly."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, normalizers

from pensieve.loaders.default_model import default_model_path
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.prefix_encoder import PrefixEncoder, eligible, split_point
from pensieve.loaders.tokenizer import TextTokenizer

WORDS = ["alpha", "beta", "  gamma", "δέλτα", "日本語", "emoji👍🏽", "x1234", "it's", "\n\n",
         "\t", "<|im_start|>", "<|im_end|>", "a.b", "(paren)", "   ", "\r\n", "end.", "'quoted'", "ß"]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_gguf_metadata(GGUFFile(default_model_path()).metadata)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice([" ", "", " ", "  ", "\n"]) for _ in range(n))


def test_the_default_tokenizer_uses_it(tok):
    assert tok._prefix is not None


def test_follow_ups_reuse_the_prefix_and_match_a_whole_encoding(tok):
    rng = random.Random(0)
    system = _text(rng, 3000)
    texts = [system + _text(rng, 40) for _ in range(6)]
    texts += [texts[2] + _text(rng, 200), texts[2][: len(texts[2]) // 2], system]
    for text in texts:
        assert tok.encode(text) == tok._encode_plain(text)
    assert tok._prefix.hits >= 7


@pytest.mark.parametrize("seed", range(4))
def test_random_shared_prefixes_match(tok, seed):
    rng = random.Random(seed)
    enc = PrefixEncoder(tok._encode_plain, size=2)
    base = _text(rng, 2500)
    for _ in range(8):
        cut = rng.randrange(len(base))
        text = base[:cut] + _text(rng, rng.randrange(1, 400))
        assert enc.encode(text) == tok._encode_plain(text)


def test_split_points_follow_a_non_space():
    assert split_point("a  b c", 1) == 1
    assert split_point("a  b c", 2) == 4
    assert split_point("abc", 0) is None


def test_tokenizers_that_may_merge_across_spaces_are_not_eligible(tok):
    spec = Tokenizer.from_str(tok.backend.to_str())
    assert eligible(spec)
    spec.normalizer = normalizers.NFKC()
    assert not eligible(spec)
