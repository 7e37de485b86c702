"""How close the AVX-512 VNNI panel GEMM (prefill) runs to what its instruction mix allows.

Two numbers on one core, by this thread's CPU time (a loaded machine disturbs it far less than
wall time):

* the instruction ceiling: a tiny assembly loop of independent ``vpdpwssd`` alone, then with
  the tile's float epilogue mixed in as the 8-row tile issues it (Q4_K: per scale group of 32
  and row, 32 ``vpdpwssd`` against convert ×2, scale product ×2, FMA ×2 and the min's FMA ×2;
  Q6_K: per 16, 16 against 2 + 2 + 2, no min) — those float operations share the two vector
  ports, so they cap the tile below the bare instruction's rate — and in the mixes of two
  layouts not built (BENCHMARKS.md): Q4_K's 6-bit scales folded into the codes with one
  epilogue per 64 (64 against 2 + 2 + 2 and the mins' 4), Q6_K's int8 sub-scales folded with
  one per 32 (32 against 6); and the tile's int32 loop itself as the kernel issues it (panel
  loads and activation broadcasts included, data in L1, no epilogue);
* the GEMM: ``pqx_linear`` (kind 2, one thread) at 64 and 512 rows for Qwen2.5-1.5B's up and
  down shapes, alternated round by round; the per-row cost is the slope between the two (the
  panels' packing is per call, the intercept), converted to ``vpdpwssd`` a second (32 products
  each) and set against both ceilings.

``.venv/bin/python -m bench.cpu_gemm_ceiling --repeats 5`` (needs gcc and an AVX-512 VNNI CPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import torch

_LOOP = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
                          return t.tv_sec + t.tv_nsec * 1e-9; }
#define D(i) "vpdpwssd %%zmm30, %%zmm31, %%zmm" #i "\n\t"
#define D16 D(0)D(1)D(2)D(3)D(4)D(5)D(6)D(7)D(8)D(9)D(10)D(11)D(12)D(13)D(14)D(15)
#define CV(i) "vcvtdq2ps %%zmm" #i ", %%zmm" #i "\n\t"
#define MU(i) "vmulps %%zmm28, %%zmm29, %%zmm" #i "\n\t"
#define FM(i) "vfmadd231ps %%zmm28, %%zmm29, %%zmm" #i "\n\t"
#define RUN(name, body, per)                                                        \
  { long n = 20000000; double t0 = now();                                           \
    __asm__ volatile("vpxord %%zmm30, %%zmm30, %%zmm30\n\t"                         \
                     "vpxord %%zmm31, %%zmm31, %%zmm31\n\t1:\n\t" body              \
                     "dec %0\n\tjnz 1b" : "+r"(n) :: "memory");                     \
    printf("%s %.4f\n", name, 20000000.0 * per / (now() - t0) / 1e9); }
int main(void) {
  RUN("dpwssd", D16 D16, 32)
  RUN("q4k_mix", D16 D16 CV(16) CV(17) MU(18) MU(19) FM(20) FM(21) FM(22) FM(23), 32)
  RUN("q6k_mix", D16 CV(16) CV(17) MU(18) MU(19) FM(20) FM(21), 16)
  RUN("q4k_fold64_mix", D16 D16 D16 D16 CV(16) CV(17) MU(18) MU(19) FM(20) FM(21)
      FM(22) FM(23) FM(24) FM(25), 64)
  RUN("q6k_fold32_mix", D16 D16 CV(16) CV(17) MU(18) MU(19) FM(20) FM(21), 32)
  { char* w = aligned_alloc(64, 1 << 16); char* x = aligned_alloc(64, 1 << 16);
    for (int i = 0; i < 1 << 16; ++i) { w[i] = (char)i; x[i] = (char)(3 * i); }
    long n = 2000000; double t0 = now();
    __asm__ volatile("1:\n\t" @TILE@ "dec %0\n\tjnz 1b" : "+r"(n) : "S"(w), "D"(x) : "memory");
    printf("tile8x32_l1 %.4f\n", 2000000.0 * 256 / (now() - t0) / 1e9); }
  return 0;
}
"""


def _tile_loop() -> str:
    """The 8-row tile's int32 sums as the kernel issues them (per value pair two panel loads,
    eight activation-pair broadcasts from rows 4 KB apart, 16 ``vpdpwssd``), 16 pairs, data in
    L1, no float epilogue."""
    lines = []
    for p in range(16):
        lines += [f"vmovdqa32 {p * 128 + 64 * j}(%%rsi), %%zmm{24 + j}" for j in range(2)]
        for r in range(8):
            lines.append(f"vpbroadcastd {p * 4 + r * 4096}(%%rdi), %%zmm28")
            lines += [f"vpdpwssd %%zmm28, %%zmm{24 + j}, %%zmm{2 * r + j}" for j in range(2)]
    return "".join(f'"{line}\\n\\t"' for line in lines)


def instruction_ceiling() -> dict[str, float]:
    """G instructions a second of ``vpdpwssd`` on this core: alone and in each tile's mix."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "loop.c"), os.path.join(tmp, "loop")
        with open(src, "w") as f:
            f.write(_LOOP.replace("@TILE@", _tile_loop()))
        subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    return {name: float(rate) for name, rate in (line.split() for line in out.splitlines())}


SHAPES = {"up 1536→8960": (1536, 8960), "down 8960→1536": (8960, 1536)}


def gemm_rates(repeats: int, rows: tuple[int, int] = (64, 512)) -> dict[tuple[str, str], dict]:
    """Per type and shape: min thread-CPU seconds of one 1-thread panel GEMM call per row
    count, alternated round by round; the per-row slope and the per-call intercept."""
    from bench.cpu_kernels import random_codes
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.cpu_quant.codes_linear import CodesLinear

    kernels = load_kernels()
    cases = {}
    for qtype in ("Q4_K", "Q6_K"):
        for shape, (k, n) in SHAPES.items():
            layer = CodesLinear(kernels, random_codes(qtype, n, k))
            cases[qtype, shape] = (layer, k, n, {m: (torch.randn(m, k), torch.empty(m, n)) for m in rows})
    best: dict[tuple[str, str, int], float] = {}
    for _ in range(repeats):
        for (qtype, shape), (layer, k, n, io) in cases.items():
            for m, (x, y) in io.items():
                t0 = time.thread_time()
                kernels.pqx_linear(x.data_ptr(), m, layer._address, y.data_ptr(), 1, 2)
                spent = time.thread_time() - t0
                best[qtype, shape, m] = min(best.get((qtype, shape, m), spent), spent)
    out = {}
    for (qtype, shape), (_layer, k, n, _io) in cases.items():
        lo, hi = (best[qtype, shape, m] for m in rows)
        per_row = (hi - lo) / (rows[1] - rows[0])
        out[qtype, shape] = {"per_row_s": per_row, "per_call_s": lo - rows[0] * per_row,
                             f"M={rows[1]} s": hi, "gmacs": k * n / per_row / 1e9}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}", flush=True)
    ceiling = instruction_ceiling()
    print("vpdpwssd G/s on one core: alone {dpwssd:.2f}, in Q4_K's tile mix {q4k_mix:.2f}, "
          "in Q6_K's {q6k_mix:.2f}; folded layouts (not built): Q4_K per 64 {q4k_fold64_mix:.2f}, "
          "Q6_K per 32 {q6k_fold32_mix:.2f}; the tile's int32 loop with its loads, data in L1 "
          "{tile8x32_l1:.2f}".format(**ceiling), flush=True)
    for (qtype, shape), r in gemm_rates(args.repeats).items():
        rate = r["gmacs"] / 32  # G vpdpwssd a second
        mix = ceiling["q4k_mix" if qtype == "Q4_K" else "q6k_mix"]
        print(f"{qtype} {shape:<15} per row {r['per_row_s'] * 1e6:7.1f} µs = {r['gmacs']:6.1f} GMAC/s"
              f" = {rate:.2f} G vpdpwssd/s: {100 * rate / ceiling['dpwssd']:3.0f}% of the bare "
              f"instruction, {100 * rate / mix:3.0f}% of its mix | per call {r['per_call_s'] * 1e3:5.2f} ms "
              f"({100 * r['per_call_s'] / r['M=512 s']:.1f}% of 512 rows)", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
