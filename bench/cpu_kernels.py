"""CPU weight-only kernels: per-shape matmul timings and end-to-end decode of the default model.

    .venv/bin/python -m bench.cpu_kernels --threads 1                # kernels + decode
    .venv/bin/python -m bench.cpu_kernels --only kernels --rows 1 4 16 64 --aten
    .venv/bin/python -m bench.cpu_kernels --only decode --repeats 5 --tokens 128
    .venv/bin/python -m bench.cpu_kernels --only profile --repeats 3   # where prefill goes
    .venv/bin/python -m bench.cpu_kernels --only profile --gguf FILE --prefill-tokens 512
    .venv/bin/python -m bench.cpu_kernels --only types --shapes 1.5b_up 1.5b_down  # per GGUF type
    .venv/bin/python -m bench.cpu_kernels --only isa --shapes 1.5b_up --types Q4_K Q6_K  # AVX2 vs VNNI
    .venv/bin/python -m bench.cpu_kernels --only decode-isa --gguf FILE --tokens 64 --repeats 3

Kernels: x[M, K] @ W.T for the SmolLM2-135M shapes, float32 (PyTorch/MKL) against the q4
(group-32 affine, the Q4_1 layers) and q8 (Q8_0, the tied output projection) kernels of
``pensieve.backends.cpu_quant`` as the modules run them (the row-tile kernel for a few rows,
the panel GEMM from ``GEMM_FROM``), q4 forced onto either kernel at every M ("q4 tiles",
"q4 gemm"), q4 dequantised to float32 per call for PyTorch's GEMM (the path prefill took
before the panel GEMM) and, with ``--aten``, PyTorch's own int4/int8 ops. Prefill shapes:
``--only kernels --rows 8 48 128 512 --cold-mb 0 --shapes o_proj qkv_proj gate_up_proj
down_proj``.
Each implementation cycles through copies of its weights totalling ``--cold-mb`` (64 MB: more
than the L3), so weights come from memory as they do in decode. Figures are µs per call, the
median over ``--repeats`` rounds, wall clock and the calling thread's CPU time (which a busy
machine's preemptions do not inflate; with more threads it misses the workers' share).

Decode: the real default model loaded with ``keep_int4`` and built by ``build_engine``; one
greedy request of ``--tokens`` tokens per round, float weights vs quantised weights, medians
over rounds, with CPU ms per token (all threads); then a ~1k-token prefill. The machine is
shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = {  # name: (in_features K, out_features N)
    "o_proj": (576, 576),
    "qkv_proj": (576, 576 + 2 * 192),
    "gate_up_proj": (576, 2 * 1536),
    "down_proj": (1536, 576),
    "lm_head": (576, 49152),
    # Qwen2.5-Coder-1.5B (hidden 1536, intermediate 8960, 12/2 heads of 128)
    "1.5b_qkv": (1536, 2048),
    "1.5b_o": (1536, 1536),
    "1.5b_gate_up": (1536, 2 * 8960),
    "1.5b_up": (1536, 8960),
    "1.5b_down": (8960, 1536),
    # Qwen2.5-Coder-0.5B (hidden 896: not a multiple of 256)
    "0.5b_qkv": (896, 1152),
    "0.5b_down": (4864, 896),
}


def timed(fns: list[Callable[[], object]], repeats: int, budget_s: float = 0.05) -> tuple[float, float]:
    """(wall, thread CPU) seconds per call, medians over rounds; each round calls every fn
    (copies of one matmul with their own weights) in turn, ≈ budget_s long."""
    for fn in fns:
        fn()
    start = time.perf_counter()
    for fn in fns:
        fn()
    once = max((time.perf_counter() - start) / len(fns), 1e-7)
    loops = max(len(fns), int(budget_s / once))
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.thread_time()
        for i in range(loops):
            fns[i % len(fns)]()
        walls.append((time.perf_counter() - start) / loops)
        cpus.append((time.thread_time() - cpu) / loops)
    return statistics.median(walls), statistics.median(cpus)


def random_groups(n: int, k: int, seed: int = 0):
    from pensieve.models.quant_linear import Int4Groups

    gen = torch.Generator().manual_seed(seed)
    return Int4Groups(
        torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
        (torch.rand(n, k // 32, generator=gen) * 0.02).half().float(),
        (torch.randn(n, k // 32, generator=gen) * 0.1).half().float(),
        32,
    )


def _copies(make: Callable[[], Callable[[torch.Tensor], torch.Tensor]], nbytes: int,
            cold_bytes: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Enough copies of a layer that cycling through them reads from memory, not cache."""
    return [make() for _ in range(max(1, min(256, -(-cold_bytes // nbytes))))]


def _forced(layer, fn_name: str) -> Callable[[torch.Tensor], torch.Tensor]:  # noqa: ANN001
    """``layer`` (a Q4Linear) through one C entry point whatever the row count."""
    fn = getattr(layer.kernels.lib, fn_name)

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], layer.out_features)
        fn(x.data_ptr(), x.shape[0], layer.in_features, *layer._args, y.data_ptr(), layer.threads)
        return y
    return call


def bench_kernels(rows: list[int], repeats: int, aten: bool, cold_bytes: int,
                  shapes: list[str]) -> list[dict]:
    from pensieve.backends.cpu_quant import Q4Linear, Q8Linear, load_kernels, pack_q8
    from pensieve.models.quant_linear import Int4Linear, Int8Linear

    kernels = load_kernels()
    results = []
    for name in shapes:
        k, n = SHAPES[name]
        groups = random_groups(n, k)
        weight = groups.dequantize()
        makers: dict[str, tuple[Callable, int]] = {
            "fp32": (lambda: (lambda x, w=weight.clone(): F.linear(x, w)), n * k * 4)}
        if kernels is not None:
            codes, scales = pack_q8(kernels, weight)
            makers["q4"] = (lambda: Q4Linear(kernels, groups, dense_from=1 << 30), n * k * 5 // 8)
            makers["q8"] = (lambda: Q8Linear(kernels, codes.clone(), scales.clone(),
                                             dense_from=1 << 30), n * k * 17 // 16)
            makers["q4 tiles"] = (lambda: _forced(Q4Linear(kernels, groups), "pq4_small"), n * k * 5 // 8)
            makers["q4 gemm"] = (lambda: _forced(Q4Linear(kernels, groups), "pq4_gemm"), n * k * 5 // 8)
            makers["q4 dequant+fp32"] = (lambda: Q4Linear(kernels, groups, dense_from=1), n * k)
        if aten:
            makers["aten int4"] = (lambda: Int4Linear(groups), n * k // 2)
            makers["aten int8"] = (lambda: Int8Linear(weight), n * k)
        impls = {impl: _copies(make, nbytes, cold_bytes) for impl, (make, nbytes) in makers.items()}
        for m in rows:
            x = torch.randn(m, k)
            row = {"shape": name, "K": k, "N": n, "M": m}
            with torch.inference_mode():
                for impl, layers in impls.items():
                    wall, cpu = timed([lambda f=f: f(x) for f in layers], repeats)
                    row[impl], row[f"{impl} cpu"] = wall * 1e6, cpu * 1e6
            results.append(row)
            print(fmt_row(row), flush=True)
        del impls
    return results


TYPES = ("Q4_K", "Q4_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL")


def random_codes(qtype: str, n: int, k: int, seed: int = 0):
    """A random [n, k] GGUF tensor of ``qtype`` (sane float16 scales) as the kernels keep it."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from pensieve.loaders.int4_codes import quant_groups

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    at = {"Q6_K": (208,), "Q5_1": (0, 2), "Q5_K": (0, 2), "Q4_K": (0, 2)}.get(qtype, (0,))
    for a in at:
        raw[:, a:a + 2] = rng.uniform(0.001, 0.01, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    return quant_groups(torch.from_numpy(raw.reshape(-1)), t, (n, k))


def bench_types(rows: list[int], repeats: int, cold_bytes: int, shapes: list[str],
                types: list[str]) -> None:
    """µs per call of each GGUF type's kernel (``CodesLinear``) against float32, per shape."""
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.cpu_quant.codes_linear import CodesLinear

    kernels = load_kernels()
    for name in shapes:
        k, n = SHAPES[name]
        if k % 256:
            types_here = [t for t in types if t[-1] != "K"]
        else:
            types_here = types
        makers = {"fp32": (lambda: (lambda x, w=torch.randn(n, k): F.linear(x, w)), n * k * 4)}
        for t in types_here:
            g = random_codes(t, n, k)
            makers[t] = (lambda g=g: CodesLinear(kernels, g), n * k)
        impls = {impl: _copies(make, nbytes, cold_bytes) for impl, (make, nbytes) in makers.items()}
        for m in rows:
            x = torch.randn(m, k)
            cells = [f"{name:<13} {k:>5}×{n:<6} M={m:<4}"]
            with torch.inference_mode():
                for impl, layers in impls.items():
                    wall, _ = timed([lambda f=f: f(x) for f in layers], repeats)
                    cells.append(f"{impl} {wall * 1e6:7.0f}")
            print(" | ".join(cells), flush=True)
        del impls


# the kernels' modes compared in one process: instruction set, and the panel GEMM's int8
# activations (``vnni8_gemm_source.py``; only the GEMM differs: row tiles are VNNI's)
MODES = {"avx2": ("avx2", False), "avx512_vnni": ("avx512_vnni", False),
         "vnni_int8": ("avx512_vnni", True)}


def set_mode(kernels, mode: str) -> None:  # noqa: ANN001
    isa, act8 = MODES[mode]
    kernels.set_isa(isa)
    kernels.set_act8(act8)


def bench_isa(rows: list[int], repeats: int, cold_bytes: int, shapes: list[str],
              types: list[str], kind: int) -> None:
    """µs per call of each GGUF type on the AVX2 and the AVX-512 VNNI kernels (and, for the
    panel GEMM, VNNI on int8 activations), interleaved round by round in one process (so a
    busy machine slows them alike); kind 1: the row tiles, 2: the panel GEMM."""
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.cpu_quant.codes_linear import CodesLinear

    kernels = load_kernels()
    isas = tuple(MODES) if kind == 2 else ("avx2", "avx512_vnni")
    for name in shapes:
        k, n = SHAPES[name]
        for t in [t for t in types if t[-1] != "K" or k % 256 == 0]:
            g = random_codes(t, n, k)
            layers = _copies(lambda g=g: CodesLinear(kernels, g), n * k, cold_bytes)
            for m in rows:
                x, y = torch.randn(m, k), torch.empty(m, n)
                fns = [lambda f=f: kernels.pqx_linear(x.data_ptr(), m, f._address, y.data_ptr(),
                                                      f.threads, kind) for f in layers]
                times: dict[str, list[float]] = {isa: [] for isa in isas}
                for _ in range(repeats):
                    for isa in isas:
                        set_mode(kernels, isa)
                        times[isa].append(timed(fns, 1)[0])
                med = {isa: statistics.median(v) * 1e6 for isa, v in times.items()}
                int8 = (f" | vnni int8 {med['vnni_int8']:8.0f} µs | int8/vnni "
                        f"{med['avx512_vnni'] / med['vnni_int8']:.2f}×, int8/avx2 "
                        f"{med['avx2'] / med['vnni_int8']:.2f}×") if "vnni_int8" in med else ""
                print(f"{name:<13} {k:>5}×{n:<6} {t:<6} M={m:<4} | avx2 {med['avx2']:8.0f} µs | "
                      f"vnni {med['avx512_vnni']:8.0f} µs | {med['avx2'] / med['avx512_vnni']:.2f}×"
                      f"{int8}", flush=True)
            del layers
    set_mode(kernels, "avx512_vnni")


def fmt_row(row: dict) -> str:
    cells = [f"{row['shape']:<13} {row['K']:>5}×{row['N']:<6} M={row['M']:<4}"]
    for key, value in row.items():
        if key not in ("shape", "K", "N", "M") and not key.endswith(" cpu"):
            cells.append(f"{key} {value:8.1f} µs (cpu {row[key + ' cpu']:8.1f})")
    if "q4" in row:
        cells.append(f"fp32/q4 {row['fp32'] / row['q4']:.2f}× (cpu {row['fp32 cpu'] / row['q4 cpu']:.2f}×)")
        cells.append(f"dequant+fp32/q4 {row['q4 dequant+fp32'] / row['q4']:.2f}×")
    return " | ".join(cells)


LONG_PROMPT = (
    "Summarise the following notes for a new colleague. " + " ".join(
        f"Note {i}: the build step {i} compiles module {i} and caches it under key {i * 7}; "
        "if it fails, the server falls back to float weights and logs a warning." for i in range(24)
    )
)


def bench_swiglu(rows: list[int], repeats: int, threads: int, types: list[str]) -> None:
    """The prefill MLP (``pqx_mlp``, Qwen2.5-1.5B's shapes) with gate/up and SiLU fused
    (``swiglu_gemm_source.py``) and as two steps (``pq_set_swiglu(0)``), alternated round by
    round in one process: min wall and min process-CPU time of each."""
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.cpu_quant.codes_linear import CodesLinear

    kernels = load_kernels()
    h, inner = SHAPES["1.5b_up"]
    for t in [t for t in types if t[-1] != "K" or h % 256 == 0]:
        gu = CodesLinear(kernels, random_codes(t, 2 * inner, h))
        down = CodesLinear(kernels, random_codes("Q4_K" if t[-1] == "K" else t, h, inner, seed=1))
        for m in rows:
            x, y = torch.randn(m, h), torch.empty(m, h)
            wall: dict[int, list[float]] = {0: [], 1: []}
            cpu: dict[int, list[float]] = {0: [], 1: []}
            for _ in range(repeats + 1):  # the first round faults the scratch in
                for fused in (0, 1):
                    kernels.lib.pq_set_swiglu(fused)
                    w0, c0 = time.perf_counter(), time.process_time()
                    kernels.pqx_mlp(x.data_ptr(), m, gu._address, down._address, y.data_ptr(), threads)
                    wall[fused].append(time.perf_counter() - w0)
                    cpu[fused].append(time.process_time() - c0)
            kernels.lib.pq_set_swiglu(1)
            w = {f: min(v[1:]) * 1e3 for f, v in wall.items()}
            c = {f: min(v[1:]) * 1e3 for f, v in cpu.items()}
            print(f"mlp {h}→2×{inner}→{h} {t:<5} M={m:<4} threads {threads} | two steps {w[0]:7.1f} ms "
                  f"(cpu {c[0]:7.1f}) | fused {w[1]:7.1f} ms (cpu {c[1]:7.1f}) | {w[0] / w[1]:.2f}× "
                  f"(cpu {c[0] / c[1]:.2f}×)", flush=True)


def decode_rounds(quantised: bool, tokens: int, repeats: int, prompt: str) -> dict:
    from pensieve.backends.torch_backend import build_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams
    from pensieve.loaders.default_model import default_model_path
    from pensieve.loaders.registry import load_checkpoint

    start = time.perf_counter()
    ckpt = load_checkpoint(default_model_path(), keep_int4=quantised)
    engine = build_engine(ckpt, EngineConfig(context_length=8192, int8_lm_head=quantised))
    built = time.perf_counter() - start
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rates, cpu_ms, prefill, text = [], [], [], ""
    for r in range(repeats + 1):  # round 0 warms up
        engine.add_request(f"d{r}", ckpt.tokenizer.encode(prompt), greedy)
        pieces = [d.text for d in engine.step()]
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while engine.has_work():
            pieces += [d.text for d in engine.step()]
            n += 1
        if r:
            rates.append(n / (time.perf_counter() - t0))
            cpu_ms.append((time.process_time() - c0) / n * 1e3)
        text = "".join(pieces)
        long_ids = ckpt.tokenizer.encode(f"[{r}] {LONG_PROMPT}")  # new first block: no cache hit
        engine.add_request(f"p{r}", long_ids, SamplingParams(max_tokens=1, temperature=0.0))
        t0 = time.perf_counter()
        while engine.has_work():
            engine.step()
        if r:
            prefill.append(len(long_ids) / (time.perf_counter() - t0))
    return {"weights": "int4+int8 head" if quantised else "float32", "built_s": built,
            "decode_tok_s": statistics.median(rates), "decode_all": rates,
            "cpu_ms_per_token": statistics.median(cpu_ms), "prefill_tok_s": statistics.median(prefill),
            "prefill_tokens": len(long_ids), "text": text}


def decode_isa(model: str | None, tokens: int, repeats: int, prompt: str) -> None:
    """Greedy decode and a cold prefill of LONG_PROMPT on one engine, alternating the kernels'
    modes (AVX2, AVX-512 VNNI, VNNI with int8 activations in the panel GEMM) round by round:
    in-process ratios that a busy machine slows alike."""
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.torch_backend import build_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams
    from pensieve.loaders.default_model import default_model_path
    from pensieve.loaders.registry import load_checkpoint

    kernels = load_kernels()
    ckpt = load_checkpoint(model or default_model_path(), keep_int4=True)
    engine = build_engine(ckpt, EngineConfig(context_length=8192, int8_lm_head=True))
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    isas = tuple(MODES)
    dec: dict[str, list[float]] = {i: [] for i in isas}
    pre: dict[str, list[float]] = {i: [] for i in isas}
    texts: dict[str, str] = {}
    for r in range(repeats + 1):  # round 0 warms up
        for isa in isas if r % 2 else isas[::-1]:
            set_mode(kernels, isa)
            engine.add_request(f"d{r}{isa}", ckpt.tokenizer.encode(prompt), greedy)
            pieces, n = [d.text for d in engine.step()], 0
            t0 = time.perf_counter()
            while engine.has_work():
                pieces += [d.text for d in engine.step()]
                n += 1
            texts[isa] = "".join(pieces)
            ids = ckpt.tokenizer.encode(f"[{r}{isa}] {LONG_PROMPT}")
            engine.add_request(f"p{r}{isa}", ids, SamplingParams(max_tokens=1, temperature=0.0))
            t1 = time.perf_counter()
            while engine.has_work():
                engine.step()
            if r:
                dec[isa].append(n / (t1 - t0))
                pre[isa].append(len(ids) / (time.perf_counter() - t1))
            print(f"round {r} {isa:<12} decode {n / (t1 - t0):6.2f} tok/s, prefill of {len(ids)} "
                  f"tokens {len(ids) / (time.perf_counter() - t1):6.1f} tok/s, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    set_mode(kernels, "avx512_vnni")
    for name, res in (("decode", dec), ("prefill", pre)):
        a, v, i8 = (statistics.median(res[m]) for m in MODES)
        print(f"{name}: avx2 {a:.2f} tok/s, vnni {v:.2f} tok/s, vnni int8 {i8:.2f} tok/s (medians "
              f"of {repeats}): vnni/avx2 {v / a:.2f}×, int8/vnni {i8 / v:.2f}×, int8/avx2 {i8 / a:.2f}×")
    same = texts["avx2"] == texts["avx512_vnni"]
    print(f"greedy text {'identical' if same else 'DIFFERS'} across ISAs: {texts['avx512_vnni'][:80]!r}")
    print(f"greedy text with int8 activations {'identical' if texts['vnni_int8'] == texts['avx512_vnni'] else 'DIFFERS'}: "
          f"{texts['vnni_int8'][:80]!r}")


PROFILED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed_tokens",
            "input_layernorm", "post_attention_layernorm", "norm", "self_attn", "mlp")


def profile_prefill(repeats: int, chunk: int, tokens: int, model: str | None = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Seconds per prefill of ``tokens`` tokens of LONG_PROMPT repeated (median round; 1.58k:
    bench.compare_cpu's prefill prompt), split by module: forward hooks time
    every linear, norm, attention and MLP module of the q4 default model in-process; the
    attention core (RoPE, KV store, SDPA) is ``self_attn`` less its two projections, the MLP
    glue (SiLU·up) ``mlp`` less its two, and ``dequantize`` the linears' weight unpacking.
    ``model``: a GGUF file instead of the default model. ``clock``: ``time.thread_time`` on one
    thread (``--threads 1 --cpu-clock``) counts this thread's CPU time, which a loaded machine
    disturbs far less than wall time."""
    from pensieve.backends.cpu_quant.linear import _QuantisedLinear
    from pensieve.backends.torch_backend import build_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams
    from pensieve.loaders.default_model import default_model_path
    from pensieve.loaders.registry import load_checkpoint

    ckpt = load_checkpoint(model or default_model_path(), keep_int4=True)
    engine = build_engine(ckpt, EngineConfig(context_length=8192, int8_lm_head=True,
                                             max_num_batched_tokens=chunk))
    spent: dict[str, float] = {}
    started: dict[int, float] = {}

    def pre(module, _args) -> None:  # noqa: ANN001 - hook signature
        started[id(module)] = clock()

    def post(kind: str):
        def hook(module, _args, _out) -> None:  # noqa: ANN001
            spent[kind] = spent.get(kind, 0.0) + clock() - started.pop(id(module))
        return hook

    for name, module in engine.runner.model.named_modules():
        kind = name.rpartition(".")[2]
        if kind in PROFILED:
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post(kind))
    dequantize = _QuantisedLinear.dequantize

    def timed_dequantize(self):  # noqa: ANN001, ANN202
        t0 = clock()
        out = dequantize(self)
        spent["dequantize"] = spent.get("dequantize", 0.0) + clock() - t0
        return out

    _QuantisedLinear.dequantize = timed_dequantize
    rounds = []
    try:
        for r in range(repeats + 1):  # round 0 warms up
            ids = ckpt.tokenizer.encode(f"[{r}] {LONG_PROMPT} {LONG_PROMPT}")[:tokens]
            spent.clear()
            engine.add_request(f"p{r}", ids, SamplingParams(max_tokens=1, temperature=0.0))
            t0 = clock()
            while engine.has_work():
                engine.step()
            if r:
                rounds.append({**spent, "total": clock() - t0, "tokens": len(ids)})
    finally:
        _QuantisedLinear.dequantize = dequantize
    best = sorted(rounds, key=lambda r: r["total"])[len(rounds) // 2]
    best["attention core"] = best["self_attn"] - best["qkv_proj"] - best["o_proj"]
    if "gate_up_proj" in best:  # else the fused MLP ran as one kernel call
        best["mlp glue"] = best["mlp"] - best["gate_up_proj"] - best["down_proj"]
    return best


def print_profile(res: dict[str, float]) -> None:
    total = res["total"]
    print(f"prefill of {res['tokens']} tokens: {total * 1e3:.0f} ms, "
          f"{res['tokens'] / total:.0f} tok/s")
    linear = sum(res.get(k, 0.0) for k in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    if "gate_up_proj" not in res:  # fused MLP: its projections and SiLU in one call
        linear += res["mlp"]
    parts = {"linears (q4; fused MLP incl. SiLU)": linear, **{k: res[k] for k in (
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "dequantize", "attention core",
        "mlp", "mlp glue", "input_layernorm", "post_attention_layernorm", "lm_head", "embed_tokens",
        "norm") if k in res}}
    layers = sum(res.get(k, 0.0) for k in ("self_attn", "mlp", "input_layernorm",
                                           "post_attention_layernorm"))
    parts["rest (adds, python, lm_head rows...)"] = total - layers - sum(
        res.get(k, 0.0) for k in ("lm_head", "embed_tokens", "norm"))
    for k, v in parts.items():
        print(f"  {k:<38} {v * 1e3:8.1f} ms  {100 * v / total:5.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("kernels", "decode", "profile", "types", "isa", "decode-isa",
                                       "swiglu"))
    ap.add_argument("--kind", type=int, default=1, help="isa: 1 row tiles, 2 panel GEMM")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=list(TYPES))
    ap.add_argument("--chunk", type=int, default=512, help="profile: prefill chunk (tokens)")
    ap.add_argument("--prefill-tokens", type=int, default=1580, help="profile: prompt tokens")
    ap.add_argument("--gguf", default=None, help="profile: this GGUF instead of the default model")
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--aten", action="store_true", help="also time PyTorch's int4/int8 ops")
    ap.add_argument("--cold-mb", type=int, default=64,
                    help="cycle through this many MB of weight copies (0: cache-resident)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="profile: time by this thread's CPU time (with --threads 1)")
    ap.add_argument("--no-swiglu", action="store_true",
                    help="profile: gate/up and SiLU as two steps (pq_set_swiglu(0))")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()}")
    if args.only in (None, "kernels"):
        bench_kernels(args.rows, args.repeats, args.aten, args.cold_mb << 20, args.shapes)
    if args.only == "types":
        bench_types(args.rows, args.repeats, args.cold_mb << 20, args.shapes, args.types)
    if args.only == "decode-isa":
        decode_isa(args.gguf, args.tokens, args.repeats, args.prompt)
    if args.only == "isa":
        bench_isa(args.rows, args.repeats, args.cold_mb << 20, args.shapes, args.types, args.kind)
    if args.only == "swiglu":
        bench_swiglu(args.rows, args.repeats, torch.get_num_threads(), args.types)
    if args.only == "profile":
        if args.no_swiglu:
            from pensieve.backends.cpu_quant import load_kernels

            load_kernels().lib.pq_set_swiglu(0)
        clock = time.thread_time if args.cpu_clock else time.perf_counter
        print_profile(profile_prefill(args.repeats, args.chunk, args.prefill_tokens, args.gguf, clock))
    if args.only in (None, "decode"):
        for quantised in (False, True):
            res = decode_rounds(quantised, args.tokens, args.repeats, args.prompt)
            print(f"{res['weights']:<15} decode {res['decode_tok_s']:6.1f} tok/s (median of "
                  f"{' '.join(f'{r:.1f}' for r in res['decode_all'])}; "
                  f"{res['cpu_ms_per_token']:.1f} ms CPU/token), prefill of "
                  f"{res['prefill_tokens']} tokens {res['prefill_tok_s']:.0f} tok/s, "
                  f"load+build {res['built_s']:.1f} s; {res['text'][:50]!r}", flush=True)
        print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
