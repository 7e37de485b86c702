"""The follow-up turn's attention at the real shapes (issue 15: turn 2 ≤ 5% of turn 1): one
layer of GLM-4.7-Flash's latent attention and of gpt-oss-20b's full attention with sinks, over a
~20k-token cached context in a paged cache of random entries, timed for turn 2's chunk (64 and
82 new tokens) on the batched kernels (``cuda_mla.CHUNK_TOKENS`` 256, ``cuda_hybrid``'s
follow-up rule) and on the path they took before (the limit at 16 / the per-sequence loop with
sinks), with the outputs compared. Times one layer; × layers is the turn's attention share
(GLM-4.7-Flash: 47 latent layers; gpt-oss-20b: 12 full + 12 windowed, the windowed already on
the chunk kernel). Random weights, bfloat16, no checkpoint: a GPU run takes well under 120 s.

    python -m bench.follow_up_attention                # CUDA, the real shapes
    TRITON_INTERPRET=1 .venv/bin/python -m bench.follow_up_attention --device cpu --small
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

PAGE = 16


def _timed(fn: Callable[[], torch.Tensor], device: str, reps: int) -> tuple[float, torch.Tensor]:
    out = fn()  # compiles, allocates
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def _sequence(cached: int, new: int, device: str):  # noqa: ANN202
    from pensieve.models.forward_context import SequenceSlice

    end = cached + new
    blocks = -(-end // PAGE)
    table = torch.randperm(blocks + 8)[:blocks].to(device)  # scattered pages
    pos = torch.arange(cached, end, device=device)
    slots = table[pos // PAGE] * PAGE + pos % PAGE
    return SequenceSlice(0, new, end, table), slots, blocks + 8, pos


def glm(device: str, dtype: torch.dtype, cached: int, new: int, small: bool, reps: int) -> str:
    from pensieve.backends import cuda_hybrid, cuda_mla
    from pensieve.models.args import MLAArgs, ModelArgs, MoEArgs
    from pensieve.models.deepseek_mla import MLAttention, softmax_scale
    from pensieve.models.forward_context import ForwardContext
    from pensieve.models.rope import RotaryEmbedding

    heads, rank, rope, nope, v, hidden, q_rank = (4, 32, 8, 16, 16, 64, 24) if small else \
        (20, 512, 64, 192, 256, 2048, 768)
    mla = MLAArgs(q_lora_rank=q_rank, kv_lora_rank=rank, qk_nope_head_dim=nope,
                  qk_rope_head_dim=rope, v_head_dim=v, softmax_scale=softmax_scale(nope + rope, None))
    args = ModelArgs(architecture="glm4_moe_lite", vocab_size=8, hidden_size=hidden,
                     intermediate_size=8, num_layers=1, num_heads=heads, num_kv_heads=1,
                     head_dim=rank + rope, mla=mla, moe=MoEArgs(4, 1, 8))
    module = MLAttention(args, 0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    module = module.to(device, dtype).eval()
    seq, slots, n_blocks, pos = _sequence(cached, new, device)
    cache = torch.randn(n_blocks, PAGE, 1, rank + rope, device=device, dtype=dtype)
    vc = torch.empty(n_blocks, PAGE, 1, 0, device=device, dtype=dtype)
    cos_sin = tuple(c.to(device, dtype) for c in RotaryEmbedding(
        rope, cached + new + 1, 10000.0, None).lookup(pos.cpu()))  # a host table
    x = torch.randn(new, hidden, device=device, dtype=dtype)
    ctx = ForwardContext([cache], [vc], slots, [seq], torch.zeros(0, dtype=torch.long))

    sms = None if device == "cuda" else 4

    def step(limit: int) -> Callable[[], torch.Tensor]:
        """The step's backend built once (as the runner does for all layers of a step)."""
        default, cuda_mla.CHUNK_TOKENS = cuda_mla.CHUNK_TOKENS, limit
        try:
            b = cuda_hybrid.CudaHybridBuilder([cache], [vc], (0,), [None], PAGE,
                                              torch.device(device), num_sms=sms,
                                              latent_heads=heads).build((0,), [[seq]], [slots])
        finally:
            cuda_mla.CHUNK_TOKENS = default
        assert (b.latent_rows(0) is not None) == (new <= limit)
        return lambda: module(x, cos_sin, replace(ctx, attention=b))

    with torch.no_grad():
        new_ms, got = _timed(step(cuda_mla.CHUNK_TOKENS), device, reps)
        old_ms, want = _timed(step(16), device, reps)
        exp_ms, ref = _timed(lambda: (setattr(module, "absorb", "never"), module(x, cos_sin, ctx))[1],
                             device, reps)
        module.absorb = "auto"
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    err_ref = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    return (f"GLM-4.7-Flash latent layer, {new} new over {cached} cached: kernel {new_ms:.2f} ms, "
            f"before (limit 16: the model's absorbed SDPA) {old_ms:.2f} ms, expanded through kv_b "
            f"{exp_ms:.2f} ms; × 47 layers: {47 * new_ms:.0f} vs {47 * old_ms:.0f} ms; rel. "
            f"diff {err:.1e} (vs expanded {err_ref:.1e})")


def gpt_oss(device: str, dtype: torch.dtype, cached: int, new: int, small: bool, reps: int) -> str:
    from pensieve.backends import cuda_hybrid
    from pensieve.models.forward_context import ForwardContext, PagedGroups, paged_attention

    hq, hk, d = (8, 2, 16) if small else (64, 8, 64)
    seq, slots, n_blocks, _ = _sequence(cached, new, device)
    kc = torch.randn(n_blocks, PAGE, hk, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(new, hq, d, device=device, dtype=dtype)
    k, v = torch.randn(new, hk, d, device=device, dtype=dtype), torch.randn(new, hk, d, device=device, dtype=dtype)
    sinks = torch.randn(hq, device=device)
    groups = PagedGroups((0,), [slots], [[seq]])
    ctx = ForwardContext([kc], [vc], slots, [seq], torch.zeros(0, dtype=torch.long), groups=groups)

    sms = None if device == "cuda" else 4
    b = cuda_hybrid.CudaHybridBuilder([kc], [vc], (0,), [None], PAGE, torch.device(device),
                                      num_sms=sms).build((0,), [[seq]], [slots])

    def step(rows: int) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            default, cuda_hybrid.FOLLOW_UP_ROWS = cuda_hybrid.FOLLOW_UP_ROWS, rows
            try:
                return paged_attention(0, q, k, v, replace(ctx, attention=b), None, sinks=sinks)
            finally:
                cuda_hybrid.FOLLOW_UP_ROWS = default
        return run

    new_ms, got = _timed(step(cuda_hybrid.FOLLOW_UP_ROWS), device, reps)
    old_ms, want = _timed(step(0), device, reps)
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    return (f"gpt-oss-20b full layer with sinks, {new} new over {cached} cached: chunk kernel "
            f"{new_ms:.2f} ms, before (the per-sequence loop) {old_ms:.2f} ms; × 12 full layers: "
            f"{12 * new_ms:.0f} vs {12 * old_ms:.0f} ms; rel. diff {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny dims (the Triton interpreter)")
    p.add_argument("--cached", type=int, nargs=2, default=[20384, 17392], help="GLM, gpt-oss")
    p.add_argument("--new", type=int, nargs=2, default=[64, 82])
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    dtype = torch.float32 if a.device == "cpu" else torch.bfloat16
    print(glm(a.device, dtype, a.cached[0], a.new[0], a.small, a.reps), flush=True)
    print(gpt_oss(a.device, dtype, a.cached[1], a.new[1], a.small, a.reps), flush=True)


if __name__ == "__main__":
    main()
