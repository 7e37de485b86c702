"""The C++ of the many-row integer GEMM (spliced into ``source.KERNEL_SOURCE`` before ``linear``).

``dot_tile`` reads each weight block once per 4 activation rows and widens its codes again
for every call; at prefill's hundreds of rows that repeated unpacking, and a float FMA per
32 products, left it slower than dequantising into a float matrix for PyTorch's GEMM. Here a
thread unpacks a *panel* of ``GNR`` weight rows to int16 once, pair-interleaved so that one
``madd_epi16`` multiplies a broadcast pair of activations (values 2p, 2p+1 of a block) with
the same pair of 8 outputs, and then runs every activation row against it in ``GMR``×``GNR``
register tiles: 16 ``madd`` + ``add`` per block give an int32 block sum per output (exact,
and exactly converted to float for q4: |Σ| ≤ 32·15·32767 < 2²⁴; q8's may round, 2⁻²⁴
relative), then one float FMA with ``scale·d`` and one with ``min·Σx`` (q4) per block and
output. A ``madd`` + ``add`` pair sustains ~1.5 per cycle on a Zen 3 core, 24 products
against 16 for float FMAs: that, and no float weight matrix to write and read, is the gain
over dequantise + float GEMM (1.3–1.6× at 512 rows, ~2–3× at 48, on 2 cores).

The numerics are the other kernels': the same int16 activation blocks and scales, the same
weight values; only the float accumulation order differs (per block instead of per lane),
so results agree with ``dot_tile``'s to float rounding. Every output row is computed by the
same operations whatever the tiling, so a row's result does not depend on the rows batched
with it (bitwise).
"""


def _block_sums_asm(pairs: int = 16) -> str:
    """One block of a 4-row × 16-output tile as GCC extended asm (AT&T): per value pair, two
    weight loads, four activation-pair broadcasts, eight ``vpmaddwd`` + ``vpaddd``. Written
    out because GCC, given the same loop as intrinsics, reassociates the sums (computing
    every product first), or spills an int32 sum and shuffles registers: ~38 GMAC/s on one
    Zen 3 core against ~58 with this sequence (the bare sequence peaks at ~73). It reads
    only the panel and the activations, which nothing writes while a tile runs (hence no
    memory clobber; ``gemm`` puts a compiler barrier after packing a panel)."""
    lines = []
    for p in range(pairs):
        lines += [f"vmovdqa {p * 64}(%[w]), %t[w0]", f"vmovdqa {p * 64 + 32}(%[w]), %t[w1]"]
        for r in range(4):
            lines += [f"vpbroadcastd {p * 4}(%[x{r}]), %t[xb]",
                      f"vpmaddwd %t[xb], %t[w0], %t[t0]", f"vpaddd %t[t0], %t[s{r}0], %t[s{r}0]",
                      f"vpmaddwd %t[xb], %t[w1], %t[t1]", f"vpaddd %t[t1], %t[s{r}1], %t[s{r}1]"]
    return "\\n".join(lines)


GEMM_SOURCE = r"""
// ------------------------------------------------------------------------- many-row GEMM

constexpr int GJ = 2;              // 8-output groups per panel
constexpr int GNR = 8 * GJ;        // weight rows (outputs) per panel
constexpr int GMR = 4;             // activation rows per register tile
constexpr int64_t GEMM_FROM = 8;   // rows from which gemm beats dot_tile (bench/cpu_kernels.py)
constexpr int GNR_MAX = 32;        // the widest panel (the AVX-512 GEMM's, vnni_gemm_source.py)

// GNR weight rows as int16 pairs: block g, pair p (values 2p, 2p+1), output i of the panel at
// int32 index (g * 16 + p) * GNR + i; float scales at [(g * SPB + h) * GNR + i] (SPB scales
// per block: 2 for group-16 formats), mins at [g * GNR + i] (zero where there are none).
struct Panel {
  int32_t* w = nullptr;
  float* sc = nullptr;
  float* mn = nullptr;
  int64_t cap = 0;
  void reserve(int64_t G) {
    if (G <= cap) return;
    free(w); free(sc); free(mn);
    cap = G;
    w = (int32_t*)aligned_alloc(64, sizeof(int32_t) * 16 * GNR_MAX * G);
    sc = (float*)aligned_alloc(64, sizeof(float) * 2 * GNR_MAX * G);
    mn = (float*)aligned_alloc(64, sizeof(float) * GNR_MAX * G);
  }
};
thread_local Panel panel_buf;

// Unpack weight rows [n0, n0 + NP) (rows from `end` on as zeros) into P, a panel NP wide.
template <int F, int NP = GNR>
void pack_panel(const Weights& W, int64_t n0, int64_t end, Panel& P) {
  const int64_t K = W.K, G = K / QK;
  alignas(32) int32_t t[NP][16];  // one block of each row: 16 pairs
  for (int i = 0; i < NP; ++i) row_params<F>(n0 + i < end ? &W : nullptr, n0 + i, G, P.sc + i, P.mn + i, NP);
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < NP; ++i) {
      const int64_t n = n0 + i;
      __m256i lo = _mm256_setzero_si256(), hi = lo;
      if (n < end) load_block16<F>(W, n, g, lo, hi);
      _mm256_store_si256((__m256i*)t[i], lo);
      _mm256_store_si256((__m256i*)(t[i] + 8), hi);
    }
    int32_t* dst = P.w + g * 16 * NP;
    for (int p = 0; p < 16; ++p)
      for (int i = 0; i < NP; ++i) dst[p * NP + i] = t[i][p];
  }
}

// The panel and activations of one gemm_tile, as plain pointers (a thread_local read in the
// loop would be a __tls_get_addr call per block in a shared library).
struct TileArgs {
  const int16_t* q;  // activation rows, int16 [M, K]
  const float* d;    // their block scales [M, G]
  const float* s;    // their block sums [M, G]
  const int32_t* w;  // the panel (Panel::w)
  const float* sc;
  const float* mn;
  float* acc;        // GMR * GNR floats: the tile's float accumulators
  int64_t K;
};

// The int32 sums s[r][j] += pairs [0, PAIRS) of block weights w times activations x (rows K
// apart): per pair one madd per 8 outputs against a broadcast activation pair.
template <int R, int PAIRS>
__attribute__((always_inline)) inline void block_sums(const int32_t* w, const int16_t* x, int64_t K,
                                                      __m256i (&s)[R][GJ]) {
  if constexpr (R == 4 && GJ == 2) {  // the hot case, written out (see _block_sums_asm)
    __m256i w0, w1, xb, t0, t1;
    if constexpr (PAIRS == 16)
      asm("@BLOCK_SUMS@"
          : [s00] "+x"(s[0][0]), [s01] "+x"(s[0][1]), [s10] "+x"(s[1][0]), [s11] "+x"(s[1][1]),
            [s20] "+x"(s[2][0]), [s21] "+x"(s[2][1]), [s30] "+x"(s[3][0]), [s31] "+x"(s[3][1]),
            [w0] "=&x"(w0), [w1] "=&x"(w1), [xb] "=&x"(xb), [t0] "=&x"(t0), [t1] "=&x"(t1)
          : [w] "r"(w), [x0] "r"(x), [x1] "r"(x + K), [x2] "r"(x + 2 * K), [x3] "r"(x + 3 * K));
    else
      asm("@BLOCK_SUMS8@"
          : [s00] "+x"(s[0][0]), [s01] "+x"(s[0][1]), [s10] "+x"(s[1][0]), [s11] "+x"(s[1][1]),
            [s20] "+x"(s[2][0]), [s21] "+x"(s[2][1]), [s30] "+x"(s[3][0]), [s31] "+x"(s[3][1]),
            [w0] "=&x"(w0), [w1] "=&x"(w1), [xb] "=&x"(xb), [t0] "=&x"(t0), [t1] "=&x"(t1)
          : [w] "r"(w), [x0] "r"(x), [x1] "r"(x + K), [x2] "r"(x + 2 * K), [x3] "r"(x + 3 * K));
  } else {
#pragma GCC unroll 4
    for (int p = 0; p < PAIRS; ++p) {
      __m256i wv[GJ];
      for (int j = 0; j < GJ; ++j) wv[j] = _mm256_load_si256((const __m256i*)(w + p * GNR + 8 * j));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        __builtin_memcpy(&pair, x + r * K + 2 * p, 4);
        const __m256i xv = _mm256_set1_epi32(pair);
        for (int j = 0; j < GJ; ++j) s[r][j] = _mm256_add_epi32(s[r][j], _mm256_madd_epi16(wv[j], xv));
      }
    }
  }
}

// acc += float(s) * scale * d (+ min * block sum when MIN), per row and output.
template <int R, bool MIN>
__attribute__((always_inline)) inline void flush(const TileArgs& a, int64_t m0, int64_t g,
                                                 const float* sc, __m256i (&s)[R][GJ]) {
  const int64_t G = a.K / QK;
  for (int r = 0; r < R; ++r) {
    const __m256 d = _mm256_set1_ps(a.d[(m0 + r) * G + g]);
    const __m256 xs = _mm256_set1_ps(a.s[(m0 + r) * G + g]);
    for (int j = 0; j < GJ; ++j) {
      float* t = a.acc + r * GNR + 8 * j;
      const __m256 prod = _mm256_mul_ps(_mm256_load_ps(sc + 8 * j), d);
      __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][j]), prod, _mm256_load_ps(t));
      if (MIN) v = _mm256_fmadd_ps(_mm256_load_ps(a.mn + g * GNR + 8 * j), xs, v);
      _mm256_store_ps(t, v);
    }
  }
}

// y[r * ldy + i] for R activation rows from m0 and the panel's first `cols` outputs. The float
// accumulators live in memory (a.acc): they change once per block, and in registers they
// would crowd out the int32 block sums (GCC then spills one of those: half the speed).
// SPB == 2 (group-16 scales): each half block's sums are scaled on their own.
template <int R, bool MIN, int SPB>
void gemm_tile(const TileArgs& a, int64_t m0, const float* bias, float* y, int64_t ldy, int cols) {
  const int64_t K = a.K, G = K / QK;
  float* const acc = a.acc;
  for (int i = 0; i < R * GNR; i += 8) _mm256_store_ps(acc + i, _mm256_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* w = a.w + g * 16 * GNR;
    const int16_t* x = a.q + m0 * K + g * QK;
    for (int h = 0; h < SPB; ++h) {
      __m256i s[R][GJ];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < GJ; ++j) s[r][j] = _mm256_setzero_si256();
      if (SPB == 1) block_sums<R, 16>(w, x, K, s);
      else block_sums<R, 8>(w + h * 8 * GNR, x + h * 16, K, s);
      flush<R, MIN && SPB == 1>(a, m0, g, a.sc + (g * SPB + h) * GNR, s);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < GJ; ++j) {
      __m256 v = _mm256_load_ps(acc + r * GNR + 8 * j);
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * j));
      float* out = y + r * ldy + 8 * j;
      if (cols >= 8 * j + 8) {
        _mm256_storeu_ps(out, v);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        for (int i = 0; i < cols - 8 * j; ++i) out[i] = tmp[i];
      }
    }
}

// The activations of M rows, quantised (rows shared out over the pool).
const Quantised& quantise_rows(const float* x, int64_t M, int64_t K, int threads) {
  qbuf.reserve(M, K);
  const int64_t G = K / QK;
  Quantised& q = qbuf;  // the caller's buffer: workers write into it
  over_rows(M, threads, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(x + m * K, K, q.q + m * K, q.d + m * G, q.s + m * G);
  });
  return q;
}

template <int R, int F>
inline void gemm_tile_for(const TileArgs& a, bool min, int64_t m0, const float* bias, float* y,
                          int64_t ldy, int cols) {
  constexpr int SPB = scales_per_block(F);
  if (min) gemm_tile<R, true, SPB>(a, m0, bias, y, ldy, cols);
  else gemm_tile<R, false, SPB>(a, m0, bias, y, ldy, cols);
}

template <int F>
void gemm_avx2(const float* x, int64_t M, const Weights& W, float* y, int threads) {
  const Quantised& xq = quantise_rows(x, M, W.K, threads);
  const int64_t N = W.ld(), K = W.K;
  const bool min = W.mins != nullptr;
  over_rows(W.N, threads, [&](int64_t n0, int64_t n1) {
    Panel& P = panel_buf;
    P.reserve(K / QK);
    alignas(32) float zero_bias[GNR] = {};
    alignas(32) float acc[GMR * GNR];
    const TileArgs a{xq.q, xq.d, xq.s, P.w, P.sc, P.mn, acc, K};
    for (int64_t p0 = n0; p0 < n1; p0 += GNR) {
      pack_panel<F>(W, p0, n1, P);
      asm volatile("" ::: "memory");  // the panel is written before the block-sum asm reads it
      const int cols = (int)(n1 - p0 < GNR ? n1 - p0 : GNR);
      const float* bias = nullptr;
      if (W.bias && cols == GNR) bias = W.bias + p0;
      else if (W.bias) {
        for (int i = 0; i < GNR; ++i) zero_bias[i] = i < cols ? W.bias[p0 + i] : 0.0f;
        bias = zero_bias;
      }
      int64_t m = 0;
      for (; m + GMR <= M; m += GMR) gemm_tile_for<GMR, F>(a, min, m, bias, y + m * N + p0, N, cols);
      float* out = y + m * N + p0;
      switch (M - m) {
        case 3: gemm_tile_for<3, F>(a, min, m, bias, out, N, cols); break;
        case 2: gemm_tile_for<2, F>(a, min, m, bias, out, N, cols); break;
        case 1: gemm_tile_for<1, F>(a, min, m, bias, out, N, cols); break;
        default: break;
      }
    }
  });
}

""".replace("@BLOCK_SUMS8@", _block_sums_asm(8)).replace("@BLOCK_SUMS@", _block_sums_asm())

# Appended after everything else (``small_linear`` is defined in source.py).
GEMM_ENTRY_POINTS = r"""
extern "C" {

// The same with the row-tile kernel (pq*_small) or the panel GEMM (pq*_gemm) whatever M is:
// pq*_linear picks by M; these are for tests and benchmarks.
void pq4_small(const float* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales,
               const uint16_t* mins, int64_t N, const float* bias, float* y, int threads) {
  small_linear<F_Q4>(x, M, Weights{codes, scales, mins, bias, K, N}, y, threads);
}

void pq4_gemm(const float* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales,
              const uint16_t* mins, int64_t N, const float* bias, float* y, int threads) {
  gemm<F_Q4>(x, M, Weights{codes, scales, mins, bias, K, N}, y, threads);
}

void pq8_small(const float* x, int64_t M, int64_t K, const int8_t* codes, const uint16_t* scales,
               int64_t N, const float* bias, float* y, int threads) {
  small_linear<F_Q8>(x, M, Weights{(const uint8_t*)codes, scales, nullptr, bias, K, N}, y, threads);
}

void pq8_gemm(const float* x, int64_t M, int64_t K, const int8_t* codes, const uint16_t* scales,
              int64_t N, const float* bias, float* y, int threads) {
  gemm<F_Q8>(x, M, Weights{(const uint8_t*)codes, scales, nullptr, bias, K, N}, y, threads);
}

}  // extern "C"
"""
