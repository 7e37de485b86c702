"""One Gated DeltaNet layer's step at Qwen3.5/3.6's real shape on a GPU: the torch path (fla's
kernels where fla-core imports, else the torch forms) against ``backends/cuda_gdn``'s fused
kernels — decode at b=1 and b=8 (eager, and replayed as a CUDA graph over a static step) and
a cached chunk of 16 … 1024 tokens (the follow-up turn's short prefill). Prints µs per layer
step and the largest difference from the torch path (outputs; states after the step).

    python3 -m bench.gdn_step [--iters 50]      # on the GPU machine (bench/gpu_session.sh)
    TRITON_INTERPRET=1 .venv/bin/python -m bench.gdn_step --device cpu --iters 1 --chunks 16
        # a smoke run of the script on the CPU (timings meaningless)
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace
from typing import Any

import torch

# Qwen3.6-35B-A3B's linear-attention layer (Qwen3.5-27B: 48 value heads, 5120 hidden)
HK, HV, DK, DV, KERNEL, HIDDEN = 16, 32, 128, 128, 4, 2048
SLOTS = 16


def layer(dtype: torch.dtype, device: str) -> Any:
    from pensieve.models.hybrid_config import GatedDeltaArgs
    from pensieve.models.qwen3_next import GatedDeltaNet

    d = GatedDeltaArgs(HK, HV, DK, DV, KERNEL, order="tiled")
    args = SimpleNamespace(hidden_size=HIDDEN, rms_norm_eps=1e-6, extra={"gated_delta": d})
    torch.manual_seed(0)
    m = GatedDeltaNet(args, 0)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape) * 0.02)
        m.norm.weight.fill_(1.0)
        m.A_log.uniform_(-2, 1)
    return m.to(device=device, dtype=dtype)


def contexts(rows: list[tuple[int, int]], static: bool, device: str
             ) -> tuple[Any, torch.Tensor, torch.Tensor]:
    from pensieve.models.forward_context import ForwardContext, RecurrentStates, SequenceSlice

    c = 2 * HK * DK + HV * DV
    torch.manual_seed(1)  # the same states for every path compared
    conv = torch.randn(SLOTS + 1, c, KERNEL - 1, device=device)
    ssm = torch.randn(SLOTS + 1, HV, DK, DV, device=device) * 0.1
    seqs, start = [], 0
    for q, ctx_len in rows:
        seqs.append(SequenceSlice(start, q, ctx_len, torch.zeros(1, dtype=torch.int64)))
        start += q
    slots = torch.arange(len(rows), device=device)
    cached = torch.ones(len(rows), dtype=torch.bool, device=device) if static else None
    states = RecurrentStates([conv], [ssm], slots, cached=cached)
    return ForwardContext([], [], torch.zeros(0), seqs, torch.zeros(0), states=states), conv, ssm


def timed(fn: Any, iters: int) -> float:
    """µs a call (CUDA events; wall time on the CPU)."""
    for _ in range(3):
        fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1000.0


def main() -> None:
    from pensieve.backends.cuda_gdn import GatedDeltaKernel
    from pensieve.models.gated_delta import fla_available

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="cuda")
    p.add_argument("--chunks", type=int, nargs="*", default=[16, 64, 256, 1024])
    a = p.parse_args()
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    m = layer(dtype, a.device)
    print(f"GPU {torch.cuda.get_device_name() if cuda else 'none (cpu)'}; layer Hk {HK} Hv {HV} Dk {DK} Dv {DV} "
          f"hidden {HIDDEN}; torch path on {'fla' if fla_available() else 'torch forms'}")
    cases = [("decode b=1", [(1, 100)], True), ("decode b=8", [(1, 100)] * 8, True)] + \
        [(f"chunk {t}", [(t, 20000)], False) for t in a.chunks]
    paths = {"torch": None, "fused": GatedDeltaKernel(max_tokens=4096),
             "fused BV=32": GatedDeltaKernel(max_tokens=4096, block_v=32)}
    for name, rows, static in cases:
        t = sum(q for q, _ in rows)
        x = torch.randn(t, HIDDEN, device=a.device, dtype=dtype)
        line, ref = [f"{name:>12}:"], None
        for path, kernel in paths.items():
            m.step_kernel = kernel
            ctx, conv, ssm = contexts(rows, static, a.device)
            conv0, ssm0 = conv.clone(), ssm.clone()
            with torch.no_grad():
                out = m(x, ctx).float()
                got = (out, conv.clone(), ssm.clone())
                conv.copy_(conv0)
                ssm.copy_(ssm0)
                us = timed(lambda: m(x, ctx), a.iters)
                line.append(f"{path} {us:8.1f} µs")
                if static and cuda:
                    graph = torch.cuda.CUDAGraph()
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        m(x, ctx)
                    torch.cuda.current_stream().wait_stream(side)
                    with torch.cuda.graph(graph):
                        m(x, ctx)
                    line.append(f"(graph {timed(graph.replay, a.iters):6.1f})")
            if ref is None:
                ref = got
            else:
                diff = max((g - r).abs().max().item() for g, r in zip(got, ref))
                line.append(f"[max diff {diff:.2e}]")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
