"""Q4_K / Q6_K with the file's super-block scales (``F_Q4K``, ``F_Q6`` with d + int8 sub-scales)
against the float16-per-sub-block layouts they replaced, kernel by kernel, in one process.

    .venv/bin/python -m bench.cpu_super_scales --baseline eadfa88 --rows 1 512 --threads 1 2

The same random GGUF blocks (``tests/unit/test_cpu_quant_codes.random_tensor``) packed both
ways: Q4_K as ``F_Q4`` (float16 scale and min per 32, still built for Q4_0/Q4_1) and as
``F_Q4K`` on this tree's library; Q6_K as ``F_Q6`` with float16 scales per 16 on
``--baseline``'s library (built from that revision's C sources, the same ``Proj`` ABI) and as
this tree's ``F_Q6``. Each call is ``pqx_linear`` (rows < 16: the row tiles; from the panel
GEMM's threshold: the GEMM) over copies of the weight totalling ``--cold-mb`` (weights come
from memory, as in decode). Rounds alternate the layouts; per layout the best of ``--repeats``
rounds: one thread's CPU time (``thread_time``: a busy machine's preemptions do not inflate
it) and, with more threads, wall time. Weight bytes per 256 values and GB/s are printed.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

SHAPES = {"gate_up": (1536, 17920, "Q4_K"), "o": (1536, 1536, "Q4_K"),
          "down": (8960, 1536, "Q6_K"), "head": (1536, 151936, "Q6_K")}


def layouts(kernels, base, qtype: str, n: int, k: int):  # noqa: ANN001
    """[(name, library, Proj, bytes, keep-alive)] of one weight in the old and new layouts."""
    from gguf import GGMLQuantizationType as Q

    from pensieve.backends.cpu_quant.codes_linear import F_Q4, F_Q6, CodesLinear, Part, Proj
    from pensieve.backends.cpu_quant.linear import pack_q4
    from pensieve.loaders.int4_codes import quant_groups
    from tests.unit.test_cpu_quant_codes import random_tensor

    groups = quant_groups(random_tensor(Q[qtype], n, k, seed=n), Q[qtype], (n, k))
    new = CodesLinear(kernels, groups)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
    out = [("super", kernels.lib, new.proj, nbytes([new.codes0, new.scales0, new.mins0]), new)]
    if qtype == "Q4_K":
        codes, scales, mins = pack_q4(kernels, groups)
        old = Proj(n_parts=1, K=k, N=n)
        old.part[0] = Part(codes.data_ptr(), scales.data_ptr(), mins.data_ptr(), None, n, F_Q4)
        out.insert(0, ("f16/32", kernels.lib, old, nbytes([codes, scales, mins]), (codes, scales, mins)))
    elif base is not None:
        scales = groups.scales.to(torch.float16).contiguous().view(torch.int16)
        old = Proj(n_parts=1, K=k, N=n)
        old.part[0] = Part(new.codes0.data_ptr(), scales.data_ptr(), None, None, n, F_Q6)
        out.insert(0, ("f16/16", base, old, nbytes([new.codes0, scales]), (scales, new)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, help="git revision with the old F_Q6 layout")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cold-mb", type=int, default=96)
    args = ap.parse_args()

    from bench.cpu_decode_profile import library_at
    from pensieve.backends.cpu_quant import load_kernels

    kernels = load_kernels()
    base = library_at(args.baseline, kernels.isa) if args.baseline else None
    import os
    print(f"isa {kernels.isa}, load {os.getloadavg()[0]:.2f}")
    for name in args.shapes:
        k, n, qtype = SHAPES[name]
        first = layouts(kernels, base, qtype, n, k)
        copies = max(1, args.cold_mb * 2**20 // first[0][3])
        sets = [first] + [layouts(kernels, base, qtype, n, k) for _ in range(copies - 1)]
        for m in args.rows:
            x = torch.randn(m, k)
            y = torch.empty(m, n)
            for threads in args.threads:
                clock = time.thread_time if threads == 1 else time.perf_counter
                best = [float("inf")] * len(first)
                for r in range(args.repeats):
                    order = range(len(first)) if r % 2 else reversed(range(len(first)))
                    for i in order:
                        calls = 0
                        t0 = clock()
                        while calls < len(sets) * 2:
                            _, lib, proj, _, _ = sets[calls % len(sets)][i]
                            lib.pqx_linear(x.data_ptr(), m, ctypes.addressof(proj), y.data_ptr(),
                                           threads, 0)
                            calls += 1
                        best[i] = min(best[i], (clock() - t0) / calls)
                cells = []
                for (label, _, _, nb, _), t in zip(first, best):
                    cells.append(f"{label} {nb * 256 / (n * k):5.1f} B/256 {t * 1e3:7.2f} ms "
                                 f"{nb / t / 1e9:5.1f} GB/s")
                print(f"{name:<8} {qtype} M={m:<4} threads {threads}: " + " | ".join(cells)
                      + f" | ratio {best[0] / best[-1]:.3f}x", flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
