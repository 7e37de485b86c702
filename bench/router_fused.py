"""One MoE router on CUDA, graphed: today's GEMM + selection kernel (sigmoid: + the ``x.float()``
cast) vs ``cuda_router_fused``'s one launch, µs a call, at Qwen3-30B-A3B's, Qwen3-Next's,
GLM-4.7-Flash's, DeepSeek-V3's and gpt-oss-20b's router shapes, 1-64 tokens; ``--sweep``: the
fused grid's bytes a program (``MIN_BYTES``), where bfloat16 takes ``tl.dot`` (``DOT_FROM``) and 8
warps, at 1 and 8 tokens; ``--all-tokens``: the fused launch past its ``max_tokens`` too (where
the selection in one program stops paying).

Each timing is a CUDA graph of 20 calls replayed (one stream, as a decode step's graph runs
them): the per-call time includes each kernel's launch inside the graph and its latency.

Usage (GPU machine): PYTHONPATH=. python3 bench/router_fused.py [--sweep] [--tokens 1,8]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

# name, gating, experts, top_k, hidden, extra MoEArgs
SHAPES = [
    ("qwen3-30b-a3b", "softmax", 128, 8, 2048, dict(norm_topk=True)),
    ("qwen3-next", "softmax", 512, 10, 2048, dict(norm_topk=True)),
    ("glm-4.7-flash", "sigmoid", 64, 4, 2048, dict(norm_topk=True, scale=1.8,
                                                  correction_bias=True)),
    ("deepseek-v3", "sigmoid", 256, 8, 7168, dict(norm_topk=True, scale=2.5,
                                                correction_bias=True, n_group=8,
                                                topk_group=4)),
    ("gpt-oss-20b", "gpt-oss", 32, 4, 2880, {}),
]


def router(gating: str, experts: int, k: int, hidden: int, extra: dict) -> torch.nn.Module:
    from pensieve.models import gpt_oss
    from pensieve.models.args import MoEArgs
    from pensieve.models.moe import Router

    moe = MoEArgs(num_experts=experts, top_k=k, expert_size=8,
                  gating="sigmoid" if gating == "sigmoid" else "softmax", **extra)
    args = SimpleNamespace(moe=moe, hidden_size=hidden)
    r = gpt_oss.Router(args) if gating == "gpt-oss" else Router(args)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(0, hidden ** -0.5)
        for b in r.buffers():
            b.normal_(0, 0.1)
    return r.to("cuda", torch.bfloat16)


def graphed_us(fn, calls: int = 20, replays: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / (replays * calls))
    return best


def run(tokens: list[int], sweep: bool, all_tokens: bool) -> None:
    from pensieve.backends import cuda_router, cuda_router_fused as fused_mod

    props = torch.cuda.get_device_properties(0)
    print(props.name, "SMs", props.multi_processor_count)
    variants = [("default", {})]
    if sweep:
        variants += [(f"min {kb} KB", {"MIN_BYTES": kb << 10}) for kb in (4, 8, 32)]
        variants += [("dot from 16", {"DOT_FROM": 16}), ("dot from 1", {"DOT_FROM": 1}),
                     ("8 warps", {"NUM_WARPS": 8})]
    for name, gating, experts, k, hidden, extra in SHAPES:
        r = router(gating, experts, k, hidden, extra)
        cuda_router.install(r, fused=False)
        for t in tokens:
            x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
            r.fused = None
            two = graphed_us(lambda: r(x))
            want_w, want_ids = r(x)
            row = [f"{name:14s} T={t:2d} two-launch {two:6.2f} us"]
            for label, patch in variants if t in (1, 8) else variants[:1]:
                saved = {key: getattr(fused_mod, key) for key in patch}
                for key, value in patch.items():
                    setattr(fused_mod, key, value)
                try:
                    r.fused = fused_mod.FusedRouter(r, gating, fused_mod.MAX_TOKENS
                                                    if all_tokens else None)
                    if t > r.fused.max_tokens:
                        row.append(f"{label}: past max_tokens {r.fused.max_tokens}")
                        continue
                    us = graphed_us(lambda: r(x))
                    w, ids = r(x)
                    same = (ids == want_ids).all(1).float().mean().item()
                    err = (w.float() - want_w.float()).abs().max().item() if same == 1 else -1
                    p = r.fused.plan
                    row.append(f"{label} ({p.blocks}x{p.split}): {us:6.2f} us "
                               f"ids-equal rows {same:.2f} max|dw| {err:.1e}")
                finally:
                    for key, value in saved.items():
                        setattr(fused_mod, key, value)
            print(" | ".join(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--all-tokens", action="store_true")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64")
    a = ap.parse_args()
    run([int(t) for t in a.tokens.split(",")], a.sweep, a.all_tokens)


if __name__ == "__main__":
    main()
