"""A CUDA start decodes a GGUF where its weights will live, and builds the same model as before.

``load_gguf(device=...)`` copies each tensor's file bytes to the device (``DeviceReader``: pinned
buffers on a GPU, plain ones here) and decodes them there with the host's own torch ops;
``CudaInt4Linear`` takes a GGUF's nibbles as its packed codes instead of unpacking and repacking
them; a CUDA model's plan lets each layer's codes go once the layer is built. None of it may
change a bit of what a model holds: small random files in llama.cpp's Q4_K_M mix (an MoE with
Q6_K experts) and Q4_0 are loaded and built both ways on this CPU and compared tensor by tensor.
The CUDA tests (skipped here) compare the GPU's decoding with the host's.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

from pensieve.loaders.int4_codes import ExpertCodes, Int8Groups
from pensieve.models.quant_linear import Int4Groups

VOCAB = "ggml-vocab-llama-spm.gguf"  # 32000 tokens
MOE = dict(arch="qwen3moe", dtype="q4_k_m", hidden=256, layers=4, heads=4, kv_heads=2,
           head_dim=64, experts=4, experts_used=2, expert_intermediate=256)
DENSE_Q4_0 = dict(arch="llama", dtype="q4_0", hidden=256, layers=2, heads=4, kv_heads=2,
                  intermediate=512)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _write(path, shape: dict) -> None:
    from bench.make_random_gguf import main
    from tests.helpers.assets import llama_cpp_models_dir

    main([str(path), "--tokenizer-from", str(llama_cpp_models_dir() / VOCAB), "--device", "cpu",
          *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    out = {}
    for name, shape in (("moe", MOE), ("q4_0", DENSE_Q4_0)):
        out[name] = root / f"{name}.gguf"
        _write(out[name], shape)
    return out


def _tensors(codes) -> list[torch.Tensor]:
    """Every tensor a loader code form holds (both forms of an ``Int4Groups``)."""
    if isinstance(codes, ExpertCodes):
        return _tensors(codes.groups)
    if isinstance(codes, Int4Groups):
        return [codes.codes, codes.scales, codes.offsets, *(codes.nibbles or ())]
    if isinstance(codes, Int8Groups):
        return [codes.codes, codes.scales, *[t for t in (codes.offsets, *(codes.k_scales or ()))
                                            if t is not None]]
    return list(codes) if isinstance(codes, tuple) else [codes]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def assert_same_checkpoint(a, b) -> None:
    for field in ("weights", "int4", "int8"):
        da, db = getattr(a, field), getattr(b, field)
        assert set(da) == set(db), field
        for name in da:
            ta, tb = _tensors(da[name]), _tensors(db[name])
            assert len(ta) == len(tb) and all(_same(x, y) for x, y in zip(ta, tb)), name


def cuda_model(ckpt, device: str = "cpu") -> nn.Module:
    """The CUDA-planned model of ``ckpt`` with its layers' buffers built (on ``device``'s
    tensors: the CPU here), as ``tests/unit/test_cuda_weight_bytes.py`` builds it."""
    from pensieve.backends.torch_backend import place_weights, plan_weights
    from pensieve.engine.config import EngineConfig
    from pensieve.models.registry import model_class

    config = EngineConfig(device="cuda", dtype=torch.bfloat16, context_length=256)
    with torch.device("meta"):
        model = model_class(ckpt.args)(ckpt.args, max_positions=256)
    planned = plan_weights(ckpt, config, packed=getattr(model, "PACKED", {}))
    place_weights(model, ckpt.args, config, planned)
    assert not planned.modules and not planned.experts  # each layer's codes let go once built
    return model.to(device=device, dtype=torch.bfloat16)


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if not _same(sa[k], sb[k])]
    assert not different, different[:5]
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]


def test_device_reader_reads_the_files_bytes(tmp_path):
    from pensieve.loaders.device_read import DeviceReader

    data = torch.randint(0, 256, (50_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "bytes.bin"
    path.write_bytes(data.numpy().tobytes())
    reader = DeviceReader(path, "cpu", chunk=4096 + 7)  # ranges across the buffers' turns
    for offset, n in ((0, 50_000), (3, 1), (4090, 20_000), (49_000, 1000), (123, 8199)):
        got = reader.read(offset, n)
        assert got.dtype == torch.uint8 and torch.equal(got, data[offset:offset + n])
    assert reader.bytes_read == 50_000 + 1 + 20_000 + 1000 + 8199
    reader.close()


@pytest.mark.parametrize("name", ["moe", "q4_0"])
def test_decoding_on_the_device_path_equals_the_maps(files, name):
    """The device path (file → buffers → device tensors, decoded there: here the CPU) gives
    every kept tensor bit for bit as the map's path does."""
    from pensieve.loaders.gguf import load_gguf

    host = load_gguf(files[name], torch.bfloat16, keep_int4=True)
    staged = load_gguf(files[name], torch.bfloat16, keep_int4=True, device="cpu")
    assert_same_checkpoint(host, staged)
    if name == "moe":
        assert any(isinstance(c, ExpertCodes) and isinstance(c.groups, Int8Groups)
                   for c in host.int4.values())  # Q6_K experts are covered


@pytest.mark.parametrize("name", ["moe", "q4_0"])
def test_cuda_layers_from_nibbles_equal_the_unpacked_codes_route(files, name):
    """The CUDA model built from a GGUF's nibbles equals, buffer for buffer, the one built from
    the unpacked codes (``pack_codes(codes)``, the route every 4-bit weight took before)."""
    from pensieve.loaders.gguf import load_gguf

    def unpacked(c):
        if isinstance(c, ExpertCodes):
            return ExpertCodes(unpacked(c.groups), c.experts)
        if isinstance(c, Int4Groups):
            assert c.nibbles is not None  # the loader's 4-bit forms are all nibbles
            u = Int4Groups(c.codes.clone(), c.scales.clone(), c.offsets.clone(), c.group_size)
            u.k_scales = c.k_scales  # Q4_K's own factors (the MoE experts' q4k layout)
            return u
        return c

    ckpt = load_gguf(files[name], torch.bfloat16, keep_int4=True)
    old = replace(ckpt, int4={k: unpacked(v) for k, v in ckpt.int4.items()})
    assert_same_model(cuda_model(ckpt), cuda_model(old))


def test_progress_is_logged(files, caplog, monkeypatch):
    from pensieve.loaders import load_progress
    from pensieve.loaders.gguf import load_gguf

    monkeypatch.setattr(load_progress, "EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="pensieve.loaders"):
        load_gguf(files["q4_0"], torch.bfloat16, keep_int4=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "pensieve.loaders"]
    assert any(line.startswith("converting the GGUF's tensors: 1/") for line in lines), lines
    assert lines[-1].startswith("converted ") and " tensors, " in lines[-1], lines[-1]


@cuda
@pytest.mark.parametrize("name", ["moe", "q4_0"])
def test_gpu_decoding_equals_the_hosts(files, name):
    from pensieve.loaders.gguf import load_gguf

    host = load_gguf(files[name], torch.bfloat16, keep_int4=True)
    gpu = load_gguf(files[name], torch.bfloat16, keep_int4=True, device="cuda")
    assert all(t.is_cuda for c in gpu.int4.values() for t in _tensors(c))
    assert_same_checkpoint(host, gpu)
    assert_same_model(cuda_model(host, "cuda"), cuda_model(gpu, "cuda"))


@cuda
def test_a_gpu_decoded_model_is_tuned_and_runs(files):
    """build_model over the GPU-decoded checkpoint: every int4 projection got its timed plan
    (asked before the plan's codes were let go), and the model equals the host-decoded one."""
    from pensieve.backends.cuda_int4 import CudaInt4Linear
    from pensieve.backends.torch_backend import build_model
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.gguf import load_gguf

    config = EngineConfig(device="cuda", dtype=torch.bfloat16, context_length=256)
    models = [build_model(load_gguf(files["moe"], torch.bfloat16, keep_int4=True, device=d),
                          config) for d in (None, "cuda")]
    for m in models:
        layers = [x for x in m.model.layers.modules() if isinstance(x, CudaInt4Linear)]
        assert layers and all(x.plan is not None for x in layers)
    assert_same_model(*models)


def test_serve_decodes_on_the_gpu_only_where_the_decoded_forms_fit(files, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from pensieve.cli import serve_torch

    size = files["moe"].stat().st_size
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    settings = lambda device, path=files["moe"]: SimpleNamespace(  # noqa: E731
        engine=SimpleNamespace(device=device), model_path=str(path))
    assert serve_torch.convert_on(settings("cpu")) is None
    free["bytes"] = int(size * serve_torch.DECODED_PER_FILE_BYTE + serve_torch.DECODE_HEADROOM) + 1
    assert serve_torch.convert_on(settings("cuda")) == "cuda"
    assert serve_torch.convert_on(settings("cuda", tmp_path)) is None  # an HF folder
    monkeypatch.setenv("PENSIEVE_CONVERT_ON", "cpu")
    assert serve_torch.convert_on(settings("cuda")) is None
    monkeypatch.delenv("PENSIEVE_CONVERT_ON")
    free["bytes"] -= 2
    assert serve_torch.convert_on(settings("cuda")) is None  # too little room: the host decodes
