"""Pages of a packed copy that a served model does not keep mapped (``backends/packed_cache.py``):
the tokenizer's JSON once the tokenizer is built, and the token embedding's codes after every
lookup (a lookup maps whole page-cache folios around the rows it reads). Lookups stay exact after
the pages go (they are the file's own bytes, faulted in again), and a table an output layer
also reads is left alone."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from pensieve.backends import packed_cache
from pensieve.backends.kernel_choice import choose
from pensieve.cli import serve_torch
from tests.unit.test_packed_cache import QWEN_05B, TEXT, cache, gguf, load, settings_for  # noqa: F401
from tests.unit.test_cpu_quant import logits

PAGE = 4096


def resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of [address, address + nbytes) mapped in this process now (pagemap's present bit)."""
    first, last = address // PAGE, (address + nbytes - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        data = f.read((last - first + 1) * 8)
    return PAGE * sum(struct.unpack_from("<Q", data, i)[0] >> 63 for i in range(0, len(data), 8))


def table_bytes(module: torch.nn.Module) -> int:
    return sum(resident_bytes(t.data_ptr(), t.numel() * t.element_size())
               for t in module.buffers() if t.numel())


def read_again(path: Path, monkeypatch: pytest.MonkeyPatch):
    """serve's load of ``path`` from its packed copy (already written): the Packed file as
    load_model read it, the checkpoint and the built model."""
    seen = []
    read = packed_cache.read_packed
    monkeypatch.setattr(packed_cache, "read_packed", lambda entry: seen.append(read(entry)) or seen[-1])
    settings = settings_for(path)
    choice = choose("auto", device="cpu")
    ckpt, _, model, write = serve_torch.load_model(settings, choice, serve_torch.packed_entry(settings, choice))
    assert write is None and len(seen) == 1 and seen[0] is not None  # mapped, not converted
    return seen[0], ckpt, model


@pytest.mark.slow
@pytest.mark.skipif(not QWEN_05B.is_file(), reason="Qwen2.5-Coder-0.5B GGUF not fetched")
def test_embedding_pages_go_after_each_lookup_and_lookups_stay_exact(tmp_path, cache, monkeypatch):  # noqa: F811
    """Qwen2.5-Coder-0.5B: a Q5_0 embedding table kept as codes, an untied Q8_0 head."""
    path = Path(shutil.copy(QWEN_05B, tmp_path / QWEN_05B.name))
    fresh_ckpt, fresh, _, _ = load(path, cache)  # converted (anonymous memory), copy written
    packed, ckpt, cached = read_again(path, monkeypatch)
    embed = cached.model.embed_tokens
    assert packed.embedding is not None and packed.embedding.spans
    assert packed_cache.drop_lookup_pages(cached, packed)  # (load_model hooked it already)
    ids = torch.tensor(ckpt.tokenizer.encode(TEXT))
    first = embed(ids)
    # the rows read are not kept mapped (but for a table's first and last partial pages)
    assert table_bytes(embed) <= 2 * PAGE * len([t for t in embed.buffers() if t.numel()])
    torch.testing.assert_close(first, fresh.model.embed_tokens(ids), rtol=0, atol=0)
    torch.testing.assert_close(embed(ids.flip(0)), first.flip(0), rtol=0, atol=0)
    assert torch.equal(logits(fresh, fresh_ckpt.args, ids.tolist()),
                       logits(cached, ckpt.args, ids.tolist()))
    # the head's pages are read every step: they stay
    head = [t for t in cached.lm_head.buffers() if t.numel()]
    assert sum(resident_bytes(t.data_ptr(), t.numel() * t.element_size()) for t in head) > 0
    # a converted model's table is anonymous memory: never dropped (it would read as zeros)
    assert not packed_cache.drop_lookup_pages(fresh, packed)


def test_tokenizer_pages_go_and_a_shared_table_is_left_alone(gguf, cache, monkeypatch):  # noqa: F811
    """SmolLM2-135M Q4_1: the tokenizer's JSON is not kept mapped once built; its tied table is
    also the output layer — not dropped."""
    load(gguf, cache)
    packed, ckpt, cached = read_again(gguf, monkeypatch)
    assert ckpt.tokenizer.encode(TEXT)  # built from the copy's JSON
    entry = serve_torch.packed_entry(settings_for(gguf), choose("auto", device="cpu"))
    with open(entry.path, "rb") as f:
        size = struct.unpack("<8sQ", f.read(16))[1]
        header = json.loads(f.read(size))
    _, _, offset, nbytes = header["tensors"]["tokenizer.json"]
    lo = -(-(header["data_offset"] + offset) // PAGE) * PAGE
    hi = (header["data_offset"] + offset + nbytes) // PAGE * PAGE
    assert hi - lo >= 64 * PAGE
    starts = mappings_of(entry.path)
    assert starts
    for start in starts:
        assert resident_bytes(start + lo, hi - lo) == 0
    assert not packed_cache.drop_lookup_pages(cached, packed)


def mappings_of(path: Path) -> list[int]:
    """Start addresses of this process's mappings of ``path`` from its first byte."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) > 5 and fields[5].strip() == str(path) and int(fields[2], 16) == 0:
                out.append(int(fields[0].split("-")[0], 16))
    return out


def test_a_long_lookup_drops_the_pages_every_few_rows():
    """A prefill chunk's lookup reads ``LOOKUP_ROWS`` rows between two drops (a 512-row read at
    once mapped ~80 MB of folios for the call), with the rows of the one-call lookup."""
    table = torch.randn(100, 6)
    drops = []
    lookup = packed_cache._sliced_lookup(lambda ids: table[ids], lambda: drops.append(1))
    assert lookup.drops_pages
    ids = torch.randint(0, 100, (3, 7 * packed_cache.LOOKUP_ROWS + 3))
    out = lookup(ids)
    assert out.shape == (*ids.shape, 6) and torch.equal(out, table[ids])
    assert len(drops) == -(-ids.numel() // packed_cache.LOOKUP_ROWS)
    drops.clear()
    assert torch.equal(lookup(torch.tensor([5])), table[[5]]) and len(drops) == 1
