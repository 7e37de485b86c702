"""The C++ of the AVX-512 VNNI panel GEMM (spliced into ``source.KERNEL_SOURCE`` after
``gemm_source.GEMM_SOURCE``), and ``gemm``, which picks it or the AVX2 one at run time.

The AVX2 GEMM's scheme on 512-bit registers: a thread unpacks a panel of ``GNRV`` = 32
weight rows to int16 pairs (``pack_panel``, the same layout 32 wide), then runs every
activation row against it in 4 × 32 register tiles. Per value pair: two weight loads, one
broadcast activation pair per row and eight ``vpdpwssd`` (multiply int16 pairs, add into
int32 lanes: ``madd`` + ``add`` in one instruction), against 16 ``madd`` + 16 ``add`` for
the same products on AVX2. With 32 vector registers the tile's float accumulators stay in
registers too (AVX2 kept them in memory). Rows in eights take an 8 × 32 tile written as asm
(``_block_sums8_asm``: 16 independent int32 sums, enough to cover ``vpdpwssd``'s latency on
both ports; the float accumulators then live in L1); the panel's transpose runs in 16 × 16
register blocks (``pack_panel_v``). Against the 4-row tile with the scalar packing, one
core's CPU time on the Qwen2.5-1.5B shapes (BENCHMARKS.md): Q4_K 1.09-1.18x at 512 rows and
1.29-1.43x at 64, Q6_K 1.00-1.04x and 1.13-1.16x. The per-group float work (convert, scale
product, FMA, min FMA: four operations per 16 ``vpdpwssd``) caps the tile near 80% of the
instruction's peak (~5.6 G/s a core here).

Numerics: the int32 block sums are the same exact integers, and each is scaled and
accumulated by the same float operations in the same order (``fma(float(s), sc·d, acc)``,
then ``fma(min, Σx, ·)``, bias last), so results are bitwise the AVX2 GEMM's — and, as there,
a row's result does not depend on the rows batched with it. ``vnni8_gemm_source.py``: the
same panel GEMM on int8 activations (``vpdpbusd``), opt-in (``g_act8``).
"""

from pensieve.backends.cpu_quant.vnni8_gemm_source import VNNI8_GEMM_SOURCE

# Activation row r of an 8-row tile, from three row pointers and the row stride (bytes).
_ROW = {0: "(%[x0])", 1: "(%[x0],%[ld],1)", 2: "(%[x0],%[ld],2)", 3: "(%[x3])",
        4: "(%[x0],%[ld],4)", 5: "(%[x3],%[ld],2)", 6: "(%[x6])", 7: "(%[x3],%[ld],4)"}


def _block_sums8_asm(pairs: int) -> str:
    """One scale group of an 8-row × 32-output tile as GCC extended asm (AT&T): the 16 int32
    sums zeroed, then per value pair two panel loads, eight activation-pair broadcasts and 16
    ``vpdpwssd``. Sixteen independent sums keep both VNNI ports busy (``vpdpwssd`` has a
    latency of ~4 cycles at two a cycle: the 4-row tile's 8 sums cap it at ~70%); written
    out because GCC, given the loop as intrinsics with 16 sums and 16 float accumulators,
    spills. Reads only the panel and the activations (the memory clobber orders it after the
    panel's packing)."""
    lines = [f"vpxord %g[s{r}{j}], %g[s{r}{j}], %g[s{r}{j}]" for r in range(8) for j in range(2)]
    for p in range(pairs):
        lines += [f"vmovdqa32 {p * 128}(%[w]), %g[w0]", f"vmovdqa32 {p * 128 + 64}(%[w]), %g[w1]"]
        for r in range(8):
            lines += [f"vpbroadcastd {p * 4}{_ROW[r]}, %g[xb]",
                      f"vpdpwssd %g[xb], %g[w0], %g[s{r}0]", f"vpdpwssd %g[xb], %g[w1], %g[s{r}1]"]
    return "\\n\\t".join(lines)


def _block_sums8(pairs: int) -> str:
    outs = ", ".join(f'[s{r}{j}] "=&v"(s[{r}][{j}])' for r in range(8) for j in range(2))
    return (f'asm volatile("{_block_sums8_asm(pairs)}"\n'
            f'        : {outs}, [w0] "=&v"(w0), [w1] "=&v"(w1), [xb] "=&v"(xb)\n'
            '        : [w] "r"(w), [x0] "r"(x), [x3] "r"(x + 3 * K), [x6] "r"(x + 6 * K), '
            '[ld] "r"(2 * K)\n        : "memory");')

VNNI_GEMM_SOURCE = r"""
// ------------------------------------------------------------------------- AVX-512 VNNI GEMM

constexpr int GNRV = 32;  // outputs per panel (two 512-bit registers)

void silu_mul(const float* g, const float* u, int64_t n, float* a);  // source.py's SwiGLU

// dst[c * ld + i] = src[i * 16 + c] for a 16 x 16 int32 block (src rows 16 apart, 64-aligned).
VNNI_TARGET inline void transpose16x16(const int32_t* src, int32_t* dst, int64_t ld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512((const void*)(src + 16 * i));
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes 0, 2 | 1, 3 of rows i, i + 4 (and + 8)
    t[2 * i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[2 * i + 1] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[8 + 2 * i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[8 + 2 * i + 1] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    _mm512_store_si512((void*)(dst + i * ld), _mm512_shuffle_i32x4(t[2 * i], t[8 + 2 * i], 0x88));
    _mm512_store_si512((void*)(dst + (i + 8) * ld), _mm512_shuffle_i32x4(t[2 * i], t[8 + 2 * i], 0xdd));
    _mm512_store_si512((void*)(dst + (i + 4) * ld), _mm512_shuffle_i32x4(t[2 * i + 1], t[8 + 2 * i + 1], 0x88));
    _mm512_store_si512((void*)(dst + (i + 12) * ld), _mm512_shuffle_i32x4(t[2 * i + 1], t[8 + 2 * i + 1], 0xdd));
  }
}

// pack_panel<F, GNRV> with the transpose in two 16 x 16 register blocks instead of 512 scalar
// moves a group: the same panel, bit for bit, in about half the time (a quarter to a tenth of
// a 64-row GEMM's time went to packing). Lanes 0-15 take rows a0.. of A and lanes 16-31 rows
// b0.. of B (rows from ea / eb on as zeros): W's rows p0..p0 + 31 are (W, p0, W, p0 + 16); the
// fused SwiGLU puts 16 gate rows beside the same 16 up rows (swiglu_gemm_source.py).
template <int F>
VNNI_TARGET void pack_panel_2(const Weights& A, int64_t a0, int64_t ea, const Weights& B,
                              int64_t b0, int64_t eb, Panel& P) {
  constexpr int NP = GNRV;
  const int64_t K = A.K, G = K / QK;
  alignas(64) int32_t t[NP][16];
  for (int i = 0; i < NP; ++i) {
    const int64_t n = (i < 16 ? a0 : b0) + (i & 15);
    row_params<F>(n < (i < 16 ? ea : eb) ? (i < 16 ? &A : &B) : nullptr, n, G, P.sc + i, P.mn + i, NP);
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < NP; ++i) {
      const Weights& W = i < 16 ? A : B;
      const int64_t n = (i < 16 ? a0 : b0) + (i & 15);
      __m256i lo = _mm256_setzero_si256(), hi = lo;
      if (n < (i < 16 ? ea : eb)) load_block16<F>(W, n, g, lo, hi);
      _mm256_store_si256((__m256i*)t[i], lo);
      _mm256_store_si256((__m256i*)(t[i] + 8), hi);
    }
    int32_t* dst = P.w + g * 16 * NP;
    transpose16x16(t[0], dst, NP);
    transpose16x16(t[16], dst + 16, NP);
  }
}

template <int F>
VNNI_TARGET inline void pack_panel_v(const Weights& W, int64_t n0, int64_t end, Panel& P) {
  pack_panel_2<F>(W, n0, end, W, n0 + 16, end, P);
}

// A finished tile row: y = v0 | v1 (+ bias), cols of them; SWIGLU: v0 are gates and v1 the
// same outputs' ups, and y[i] = silu_mul(v0 + bias, v1 + bias[16..]) for i < cols (cols a
// multiple of 8: the very function silu_rows applies, so bitwise the unfused MLP).
template <bool SWIGLU>
VNNI_TARGET inline void store_row(__m512 v0, __m512 v1, const float* bias, float* y, int cols) {
  if (bias) {
    v0 = _mm512_add_ps(v0, _mm512_loadu_ps(bias));
    v1 = _mm512_add_ps(v1, _mm512_loadu_ps(bias + 16));
  }
  if constexpr (SWIGLU) {
    alignas(64) float t[32];
    _mm512_store_ps(t, v0);
    _mm512_store_ps(t + 16, v1);
    silu_mul(t, t + 16, cols, y);
    return;
  }
  for (int j = 0; j < 2; ++j) {
    const __m512 v = j ? v1 : v0;
    const int left = cols - 16 * j;
    if (left >= 16) _mm512_storeu_ps(y + 16 * j, v);
    else if (left > 0) _mm512_mask_storeu_ps(y + 16 * j, (__mmask16)((1u << left) - 1), v);
  }
}

// One R x 32 tile: activation rows m0.. against the panel, y[r * ldy + i] for i < cols.
template <int R, bool MIN, int SPB, bool SWIGLU = false>
VNNI_TARGET void gemm_tile_vnni(const TileArgs& a, int64_t m0, const float* bias, float* y,
                                int64_t ldy, int cols) {
  const int64_t K = a.K, G = K / QK;
  constexpr int PAIRS = 16 / SPB;  // value pairs per scale group
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* w = a.w + g * 16 * GNRV;
    const int16_t* x = a.q + m0 * K + g * QK;
    for (int h = 0; h < SPB; ++h) {
      __m512i s[R][2];
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int p = 0; p < PAIRS; ++p) {
        const int32_t* wp = w + (h * PAIRS + p) * GNRV;
        const __m512i w0 = _mm512_load_si512((const void*)wp);
        const __m512i w1 = _mm512_load_si512((const void*)(wp + 16));
        for (int r = 0; r < R; ++r) {
          int32_t pair;
          __builtin_memcpy(&pair, x + r * K + 2 * (h * PAIRS + p), 4);
          const __m512i xb = _mm512_set1_epi32(pair);
          s[r][0] = _mm512_dpwssd_epi32(s[r][0], w0, xb);
          s[r][1] = _mm512_dpwssd_epi32(s[r][1], w1, xb);
        }
      }
      const float* sc = a.sc + (g * SPB + h) * GNRV;
      const __m512 sc0 = _mm512_load_ps(sc), sc1 = _mm512_load_ps(sc + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_set1_ps(a.d[(m0 + r) * G + g]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][0]), _mm512_mul_ps(sc0, d), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][1]), _mm512_mul_ps(sc1, d), acc[r][1]);
        if (MIN && SPB == 1) {
          const __m512 xs = _mm512_set1_ps(a.s[(m0 + r) * G + g]);
          acc[r][0] = _mm512_fmadd_ps(_mm512_load_ps(a.mn + g * GNRV), xs, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(_mm512_load_ps(a.mn + g * GNRV + 16), xs, acc[r][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) store_row<SWIGLU>(acc[r][0], acc[r][1], bias, y + r * ldy, cols);
}

template <int R, int F, bool SWIGLU = false>
VNNI_TARGET inline void gemm_tile_vnni_for(const TileArgs& a, bool min, int64_t m0,
                                           const float* bias, float* y, int64_t ldy, int cols) {
  constexpr int SPB = scales_per_block(F);
  if (min) gemm_tile_vnni<R, true, SPB, SWIGLU>(a, m0, bias, y, ldy, cols);
  else gemm_tile_vnni<R, false, SPB, SWIGLU>(a, m0, bias, y, ldy, cols);
}

// One 8 x 32 tile (the bulk of a prefill's rows): the same numbers as gemm_tile_vnni<8>, by
// the same float operations in the same order; its 16 int32 sums take the registers, so the
// float accumulators live in a.acc (8 * 32 floats, L1), loaded and stored once per group.
template <bool MIN, int SPB, bool SWIGLU = false>
VNNI_TARGET void gemm_tile_vnni8r(const TileArgs& a, int64_t m0, const float* bias, float* y,
                                  int64_t ldy, int cols) {
  const int64_t K = a.K, G = K / QK;
  float* const facc = a.acc;
  for (int i = 0; i < 8 * GNRV; i += 16) _mm512_store_ps(facc + i, _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
    for (int h = 0; h < SPB; ++h) {
      const int32_t* w = a.w + (g * 16 + h * 8) * GNRV;
      const int16_t* x = a.q + m0 * K + g * QK + h * 16;
      __m512i s[8][2], w0, w1, xb;
      if constexpr (SPB == 1) {
        @BLOCK16@
      } else {
        @BLOCK8@
      }
      const float* sc = a.sc + (g * SPB + h) * GNRV;
      const __m512 sc0 = _mm512_load_ps(sc), sc1 = _mm512_load_ps(sc + 16);
      for (int r = 0; r < 8; ++r) {
        const __m512 d = _mm512_set1_ps(a.d[(m0 + r) * G + g]);
        float* f = facc + r * GNRV;
        __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][0]), _mm512_mul_ps(sc0, d), _mm512_load_ps(f));
        __m512 v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][1]), _mm512_mul_ps(sc1, d), _mm512_load_ps(f + 16));
        if (MIN && SPB == 1) {
          const __m512 xs = _mm512_set1_ps(a.s[(m0 + r) * G + g]);
          v0 = _mm512_fmadd_ps(_mm512_load_ps(a.mn + g * GNRV), xs, v0);
          v1 = _mm512_fmadd_ps(_mm512_load_ps(a.mn + g * GNRV + 16), xs, v1);
        }
        _mm512_store_ps(f, v0);
        _mm512_store_ps(f + 16, v1);
      }
    }
  }
  for (int r = 0; r < 8; ++r)
    store_row<SWIGLU>(_mm512_load_ps(facc + r * GNRV), _mm512_load_ps(facc + r * GNRV + 16), bias,
                      y + r * ldy, cols);
}

// y = xq @ W.T on activations already quantised (the fused SwiGLU hands its output so).
template <int F>
void gemm_vnni_q(const Quantised& xq, int64_t M, const Weights& W, float* y, int threads) {
  const int64_t N = W.ld(), K = W.K;
  const bool min = W.mins != nullptr;
  over_rows(W.N, threads, [&](int64_t n0, int64_t n1) {
    Panel& P = panel_buf;
    P.reserve(K / QK);
    alignas(64) float part_bias[GNRV] = {};
    alignas(64) float facc[8 * GNRV];
    const TileArgs a{xq.q, xq.d, xq.s, P.w, P.sc, P.mn, facc, K};
    for (int64_t p0 = n0; p0 < n1; p0 += GNRV) {
      pack_panel_v<F>(W, p0, n1, P);
      const int cols = (int)(n1 - p0 < GNRV ? n1 - p0 : GNRV);
      const float* bias = nullptr;
      if (W.bias && cols == GNRV) bias = W.bias + p0;
      else if (W.bias) {
        for (int i = 0; i < GNRV; ++i) part_bias[i] = i < cols ? W.bias[p0 + i] : 0.0f;
        bias = part_bias;
      }
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) {
        if (min) gemm_tile_vnni8r<true, scales_per_block(F)>(a, m, bias, y + m * N + p0, N, cols);
        else gemm_tile_vnni8r<false, scales_per_block(F)>(a, m, bias, y + m * N + p0, N, cols);
      }
      for (; m + GMR <= M; m += GMR) gemm_tile_vnni_for<GMR, F>(a, min, m, bias, y + m * N + p0, N, cols);
      float* out = y + m * N + p0;
      switch (M - m) {
        case 3: gemm_tile_vnni_for<3, F>(a, min, m, bias, out, N, cols); break;
        case 2: gemm_tile_vnni_for<2, F>(a, min, m, bias, out, N, cols); break;
        case 1: gemm_tile_vnni_for<1, F>(a, min, m, bias, out, N, cols); break;
        default: break;
      }
    }
  }, GNRV);
}

template <int F>
void gemm_vnni(const float* x, int64_t M, const Weights& W, float* y, int threads) {
  gemm_vnni_q<F>(quantise_rows(x, M, W.K, threads), M, W, y, threads);
}

""".replace("@BLOCK16@", _block_sums8(16)).replace("@BLOCK8@", _block_sums8(8)) + VNNI8_GEMM_SOURCE + r"""
// The panel GEMM on the selected instruction set (and activations: int8 where g_act8).
template <int F>
void gemm(const float* x, int64_t M, const Weights& W, float* y, int threads) {
  if (g_vnni && g_act8) gemm_vnni8<F>(x, M, W, y, threads);
  else if (g_vnni) gemm_vnni<F>(x, M, W, y, threads);
  else gemm_avx2<F>(x, M, W, y, threads);
}

"""
