"""Decode's memory roof on this CPU: read bandwidth (1 and all threads) and the bytes a decoded
token reads, in the GGUF's own layout and in the CPU kernels' layout of it.

    .venv/bin/python -m bench.decode_roofline --gguf ~/.cache/pensieve/models/Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf

Bandwidth: a STREAM-like read (AVX2 loads summed, no writes) over a 1 GiB buffer split
between threads, best of 5, compiled with the system C compiler. Bytes per token: every
tensor but the token embedding (one row a token), once. The kernels' layout (``source.py``):
Q4_0/Q4_1 as q4 — 16 code bytes + a float16 scale and min per 32; Q4_K as the same nibbles
with the file's own super-block scales (6-bit, 12 bytes + float16 d, dmin a 256: 144 bytes a
256, the file's size); Q6_K as packed 6-bit codes, 24 bytes per 32 + float16 d and 16 int8
sub-scales a 256 (210 bytes a 256, the file's size); other types are counted at their GGUF
size (not in this file). Before the super-block scales were kept (eadfa88 and earlier) Q4_K
was 160 bytes a 256 and Q6_K 224. A decode step at the roof runs at bandwidth / bytes tokens
a second.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

READ_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef struct { const char* p; size_t n; long long out; } Arg;
static void* rd(void* v) {
  Arg* a = (Arg*)v; __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < a->n; i += 128) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i*)(a->p + i)));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256((const __m256i*)(a->p + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256((const __m256i*)(a->p + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256((const __m256i*)(a->p + i + 96)));
  }
  s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  a->out = _mm256_extract_epi64(s0, 0);
  return 0;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
double read_gbs(int threads, size_t bytes, int repeats) {
  char* p = aligned_alloc(64, bytes); memset(p, 1, bytes);
  double best = 1e9;
  for (int r = 0; r < repeats; ++r) {
    pthread_t t[64]; Arg a[64]; double t0 = now();
    for (int i = 0; i < threads; ++i) { a[i].p = p + i * (bytes / threads); a[i].n = bytes / threads; pthread_create(&t[i], 0, rd, &a[i]); }
    for (int i = 0; i < threads; ++i) pthread_join(t[i], 0);
    double dt = now() - t0; if (dt < best) best = dt;
  }
  free(p);
  return bytes / best / 1e9;
}
"""

Q4 = {"Q4_0", "Q4_1"}  # q4: 20 bytes a block of 32
SUPER = {"Q4_K": 144, "Q6_K": 210}  # bytes a 256 with the file's super-block scales


def read_bandwidth(threads: int, bytes_: int = 1 << 30, repeats: int = 5) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "read.c", Path(tmp) / "read.so"
        src.write_text(READ_C)
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-mavx2", "-shared", "-fPIC", "-pthread",
                        str(src), "-o", str(lib)], check=True)
        fn = ctypes.CDLL(str(lib)).read_gbs
        fn.restype, fn.argtypes = ctypes.c_double, (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
        return fn(threads, bytes_, repeats)


def token_bytes(gguf: str) -> tuple[int, int]:
    """(GGUF bytes, kernel-layout bytes) read per decoded token."""
    from gguf import GGUFReader

    ours = file = 0
    for t in GGUFReader(gguf).tensors:
        if t.name == "token_embd.weight":
            continue
        n, kind = int(t.n_bytes), t.tensor_type.name
        file += n
        values = int(t.n_elements)
        ours += values // 32 * 20 if kind in Q4 else values // 256 * SUPER[kind] if kind in SUPER else n
    return file, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = ap.parse_args()
    print(f"load average {os.getloadavg()}")
    gbs = {t: read_bandwidth(t) for t in args.threads}
    for t, v in gbs.items():
        print(f"read bandwidth, {t} thread(s): {v:.1f} GB/s")
    file, ours = token_bytes(args.gguf)
    best = max(gbs.values())
    print(f"bytes a decoded token reads: GGUF layout {file / 1e6:.1f} MB, kernel layout "
          f"{ours / 1e6:.1f} MB ({ours / file:.3f}x)")
    print(f"roof at {best:.1f} GB/s: GGUF layout {best * 1e9 / file:.1f} tok/s, kernel layout "
          f"{best * 1e9 / ours:.1f} tok/s; 1.2x the GGUF layout's roof needs "
          f"{file / 1.2 / 1e6:.0f} MB a token")


if __name__ == "__main__":
    main()
