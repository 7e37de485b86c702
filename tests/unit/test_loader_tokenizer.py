"""TextTokenizer from GGUF metadata (byte-level BPE and SentencePiece) and from tokenizer.json."""

from __future__ import annotations

import json
import logging

import pytest
from gguf import TokenType
from tokenizers import processors

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.tokenizer import TextTokenizer
from tests.unit.loader_fixtures import SPECIALS, bpe_tokens_and_merges, tiny_bpe_tokenizer

TEXTS = [
    "hello world",
    "the quick brown fox, the lazy dog!",
    "  two leading spaces and a tab\tthen\nnewlines\n\n",
    "naïve café — 日本語 🤗 unseen: ßø∂ƒ",
    "def main():\n    return 42\n",
    "",
]


@pytest.fixture(scope="module")
def source():
    return tiny_bpe_tokenizer()


def bpe_metadata(source, pre="default", **extra):
    tokens, merges = bpe_tokens_and_merges(source)
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL
                                      for t in tokens],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }
    meta.update(extra)
    return meta


def test_gguf_bpe_matches_source_tokenizer(source):
    tok = TextTokenizer.from_gguf_metadata(bpe_metadata(source))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == source.encode(text).ids, text
        assert tok.decode(ids) == text
    assert len(tok.encode("hello world")) < len("hello world")  # merges were applied


def test_specials_parse_to_single_ids_and_survive_decode(source):
    tok = TextTokenizer.from_gguf_metadata(bpe_metadata(source))
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|>"
    assert tok.is_special(1) and tok.is_special(0)
    assert not tok.is_special(ids[1])
    assert tok.id_to_piece(1) == "<|im_start|>"
    assert tok.id_to_piece(tok.encode(" world")[0]).startswith("Ġ")
    with pytest.raises(IndexError):
        tok.id_to_piece(10**6)


def test_bos_eos_and_end_of_turn_ids(source):
    tok = TextTokenizer.from_gguf_metadata(bpe_metadata(source, **{
        "tokenizer.ggml.add_bos_token": True}))
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token) == ("<|im_start|>", 1, "<|im_end|>")
    assert tok.eos_token_ids == {0, 2}  # eos <|im_end|> plus <|endoftext|> found in the vocab
    assert tok.add_bos and tok.vocab_size == source.get_vocab_size()
    assert tok.encode("hello")[0] != 1  # encode never adds BOS itself


@pytest.mark.parametrize("pre,words", [
    ("default", ["abc", "Ġ12345", "Ġdef"]),
    ("smollm", ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġdef"]),
    ("llama-bpe", ["abc", "Ġ", "123", "45", "Ġdef"]),
    ("qwen2", ["abc", "Ġ", "1", "2", "3", "4", "5", "Ġdef"]),
])
def test_pre_tokenizer_follows_gguf_pre(source, pre, words):
    tok = TextTokenizer.from_gguf_metadata(bpe_metadata(source, pre=pre))
    split = tok.backend.pre_tokenizer.pre_tokenize_str("abc 12345 def")
    assert [w for w, _ in split] == words


def test_unknown_pre_falls_back_with_a_warning(source, caplog):
    with caplog.at_level(logging.WARNING):
        tok = TextTokenizer.from_gguf_metadata(bpe_metadata(source, pre="brand-new"))
    assert "brand-new" in caplog.text
    assert tok.encode("hello world") == source.encode("hello world").ids


def test_unusable_metadata_is_a_checkpoint_error(source):
    with pytest.raises(CheckpointError, match="tokens"):
        TextTokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(CheckpointError, match="'bert'"):
        TextTokenizer.from_gguf_metadata(bpe_metadata(source, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(CheckpointError, match="merge"):
        TextTokenizer.from_gguf_metadata(bpe_metadata(source, **{"tokenizer.ggml.merges": ["ab"]}))


# --- SentencePiece (tokenizer.ggml.model == "llama") --------------------------------------

SPM_PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "▁h", "ll", "he", "▁t", "▁w", "or",
              "ld", "llo", "▁he", "▁hello", "▁wor", "▁world", "th", "▁the", "▁▁", "lo", "el"]


def spm_metadata(scores_seed=0):
    import random

    rng = random.Random(scores_seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
             + [TokenType.NORMAL] * len(SPM_PIECES))
    scores = [0.0] * 259 + [rng.uniform(-100, 0) for _ in SPM_PIECES]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def spm_reference(text: str, meta) -> list[int]:
    """llama.cpp's SPM algorithm, naively: merge the best-scoring adjacent pair until none."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    normal = {t: i for i, t in enumerate(tokens)
              if meta["tokenizer.ggml.token_type"][i] == TokenType.NORMAL}
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        candidates = [(scores[normal[a + b]], -i) for i, (a, b) in
                      enumerate(zip(symbols, symbols[1:])) if a + b in normal]
        if not candidates:
            break
        i = -max(candidates)[1]
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    ids = []
    for s in symbols:
        ids.extend([normal[s]] if s in normal else [3 + b for b in s.encode("utf-8")])
    return ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sentencepiece_matches_llamacpp_algorithm(seed):
    meta = spm_metadata(seed)
    tok = TextTokenizer.from_gguf_metadata(meta)
    for text in ["hello world", "the world hello", "hello  world", "hellohello wor",
                 "thé world ü", "ld ll lo el", "helloworld"]:
        assert tok.encode(text) == spm_reference(text, meta), text
        assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_specials_and_defaults():
    tok = TextTokenizer.from_gguf_metadata(spm_metadata())
    hello, world = 259 + SPM_PIECES.index("▁hello"), 259 + SPM_PIECES.index("▁world")
    assert tok.encode("hello world") == [hello, world]
    assert tok.encode("<s>hello</s>") == [1, hello, 2]  # llama.cpp: space prefix after specials
    assert tok.add_bos and tok.bos_token == "<s>" and tok.eos_token_ids == {2}
    assert tok.encode("é") == [259, 3 + 0xC3, 3 + 0xA9]  # "▁", then byte fallback
    assert tok.is_special(1) and not tok.is_special(hello)


# --- tokenizer.json folders ------------------------------------------------------------------

def write_hf_tokenizer(folder, source, config, generation=None):
    folder.mkdir(parents=True, exist_ok=True)
    source.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_from_tokenizer_json_reads_config(tmp_path, source):
    folder = write_hf_tokenizer(tmp_path / "m", source, {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|endoftext|>", "add_bos_token": False,
    }, generation={"eos_token_id": [0, 2]})
    tok = TextTokenizer.from_tokenizer_json(folder)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token) == ("<|im_start|>", 1, "<|endoftext|>")
    assert tok.eos_token_ids == {0, 2} and not tok.add_bos
    assert tok.encode("hello <|im_end|>") == source.encode("hello <|im_end|>").ids
    assert tok.is_special(2)


def test_from_tokenizer_json_infers_add_bos_from_post_processor(tmp_path, source):
    with_bos = tiny_bpe_tokenizer()
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    folder = write_hf_tokenizer(tmp_path / "m", with_bos, {"bos_token": "<|im_start|>",
                                                          "eos_token": "<|im_end|>"})
    tok = TextTokenizer.from_tokenizer_json(folder)
    assert tok.add_bos
    assert tok.encode("hello")[0] != 1  # the post-processor is not applied by encode
    plain = write_hf_tokenizer(tmp_path / "p", source, {"bos_token": "<|im_start|>"})
    assert not TextTokenizer.from_tokenizer_json(plain).add_bos


def test_from_tokenizer_json_needs_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextTokenizer.from_tokenizer_json(tmp_path)
