"""Pensieve's GGUF tokenizers against llama.cpp's own test vectors.

Each ``ggml-vocab-NAME.gguf`` in llama.cpp's ``models/`` comes with ``.inp`` (texts
separated by a ``\\n__ggml_vocab_test__\\n`` line) and ``.out`` (one line of expected ids
per text). llama.cpp's ``test-tokenizer-0`` encodes them with no BOS/EOS added and
special tokens not parsed; the texts hold no special tokens, so ``encode`` must give
exactly those ids, and ``decode`` of those ids must give the text back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.tokenizer import TextTokenizer

SEPARATOR = "\n__ggml_vocab_test__\n"
DECODER_VOCABS = (
    "qwen2", "qwen35", "phi-3", "gemma-4", "llama-spm", "llama-bpe", "command-r",
    "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "mpt", "starcoder", "refact",
)
# WordPiece (BERT) vocabularies serve embedding models; Pensieve serves decoder LLMs
UNSUPPORTED = {"bert-bge": "WordPiece (BERT) vocab: not supported by design"}

_built: dict[str, TextTokenizer] = {}


def read_vectors(models: Path, name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids) pairs, split the way llama.cpp's test-tokenizer-0 splits them."""
    raw = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = raw.split(SEPARATOR)
    if texts[-1] == "":  # the file ends with a separator
        texts.pop()
    lines = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    if len(lines) < len(texts) or any(line.strip() for line in lines[len(texts):]):
        raise ValueError(f"{name}: {len(texts)} texts but {len(lines)} id lines")
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def tokenizer_for(models: Path, name: str) -> TextTokenizer:
    if name not in _built:
        meta = GGUFFile(models / f"ggml-vocab-{name}.gguf").metadata
        _built[name] = TextTokenizer.from_gguf_metadata(meta)
    return _built[name]


def _vocab_params() -> list:
    params = [pytest.param(n, id=n) for n in DECODER_VOCABS]
    params += [pytest.param(n, id=n, marks=pytest.mark.xfail(reason=why, raises=CheckpointError,
                                                              strict=True))
               for n, why in UNSUPPORTED.items()]
    return params


def test_every_vector_file_is_covered(llama_cpp_models_dir: Path) -> None:
    found = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf.inp")
             for p in llama_cpp_models_dir.glob("ggml-vocab-*.gguf.inp")}
    assert found == set(DECODER_VOCABS) | set(UNSUPPORTED)


@pytest.mark.parametrize("name", _vocab_params())
def test_encode_matches_llama_cpp(llama_cpp_models_dir: Path, name: str) -> None:
    vectors = read_vectors(llama_cpp_models_dir, name)
    assert len(vectors) >= 40
    tok = tokenizer_for(llama_cpp_models_dir, name)
    wrong = [(text, want, got) for text, want in vectors if (got := tok.encode(text)) != want]
    assert not wrong, "\n".join(f"{t!r}: want {w} got {g}" for t, w, g in wrong[:5])


@pytest.mark.parametrize("name", _vocab_params())
def test_decode_round_trips(llama_cpp_models_dir: Path, name: str) -> None:
    tok = tokenizer_for(llama_cpp_models_dir, name)
    for text, ids in read_vectors(llama_cpp_models_dir, name):
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text)) == text


def test_gemma4_vocab_adds_bos(llama_cpp_models_dir: Path) -> None:
    """llama.cpp turns BOS on for Gemma 4 whatever its GGUF says; so do we."""
    tok = tokenizer_for(llama_cpp_models_dir, "gemma-4")
    assert tok.add_bos and tok.bos_token == "<bos>" and tok.bos_token_id == 2
