"""The C++ of the AVX-512 VNNI panel GEMM on int8 activations (``vpdpbusd``), spliced into
``vnni_gemm_source.VNNI_GEMM_SOURCE`` before ``gemm``, which runs it where ``g_act8`` is set
(``pq_set_act8``; ``Kernels.set_act8``, ``PENSIEVE_CPU_ACT8=1``) and the CPU has VNNI.

Activations are quantised per block of 32 to int8, ``x ≈ d·q`` with ``d = max|x| / 127`` (as
llama.cpp's q8 blocks), and stored as ``q + 128`` (unsigned): ``vpdpbusd`` multiplies four
unsigned bytes by four signed ones and adds the four products into an int32 lane, so one
instruction does what two ``vpdpwssd`` do on int16 pairs. The weights' codes are all signed
bytes in every format (q4 0..15, the int8-code formats −128..127, Q6_K −32..31), so the panel
holds them as they are (q4's centred, ``c − 8``, its min taking ``8·scale``: an activation's
rounding error then meets codes half as large), four values to a 32-bit lane, and the offset
comes back exactly:
``Σ (q + 128)·c = Σ q·c + 128·Σ c``, with ``128·Σ c`` per output and scale group computed once
when the panel is packed (``sw``) and subtracted from the int32 sums. Everything after the
int32 block sums — scales, the q4 ``min · Σx`` term with the exact float block sum, bias —
is the int16 GEMM's.

Numerics: the only difference from the int16 path is the activations' rounding: a value's
error is ≤ d/2 = max|x|/254 of its block (int16: max|x|/65534), ~3e-3 relative on a matmul
against ~1e-5 (``tests/unit/test_cpu_quant_act8.py`` states both). A row one value of which
holds most of its energy (``massive_row``: a first token's massive activations, where int8
blocks lose everything else — 2.1 of 21 on Qwen2.5-Coder-1.5B's position-0 logits, 0.4 with
this) is recomputed on int16 by the row tiles; decided from the row alone, so a row's result
still does not depend on its batch.
"""

VNNI8_GEMM_SOURCE = r"""
// ------------------------------------------------------------------------- VNNI int8 GEMM

int g_act8 = 0;  // 1: the panel GEMM runs on int8 activations (gemm_vnni8) where g_vnni

// One row of K floats -> K/32 blocks of int8 (x ~ d*q, d = max|x| / 127) stored as q + 128,
// their scales d and the exact float block sums s.
void quantize_row8(const float* x, int64_t K, uint8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < K / QK; ++g) {
    const float* b = x + g * QK;
    const __m256 v0 = _mm256_loadu_ps(b), v1 = _mm256_loadu_ps(b + 8);
    const __m256 v2 = _mm256_loadu_ps(b + 16), v3 = _mm256_loadu_ps(b + 24);
    const __m256 a = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
        _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    const float amax = hmax(a);
    d[g] = amax / 127.0f;
    s[g] = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    // two per-lane packs leave 4-value runs as (i0 i1 i2 i3 | i0 i1 i2 i3): reorder the runs
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, order);
    _mm256_storeu_si256((__m256i*)(q + g * QK), _mm256_xor_si256(ordered, _mm256_set1_epi8((char)0x80)));
  }
}

struct Quantised8 {
  uint8_t* q = nullptr;
  float* d = nullptr;
  float* s = nullptr;
  std::vector<char> massive;  // per row: massive_row (gemm_vnni8 recomputes those on int16)
  int64_t cap = 0;
  void reserve(int64_t M, int64_t K) {
    if (M * K <= cap) return;
    free(q); free(d); free(s);
    cap = M * K;
    q = (uint8_t*)aligned_alloc(64, ((cap + 63) / 64) * 64);
    d = (float*)malloc(sizeof(float) * (cap / QK + 1));
    s = (float*)malloc(sizeof(float) * (cap / QK + 1));
  }
};
thread_local Quantised8 q8buf;

template <int F>
void small_linear(const float* x, int64_t M, const Weights& W, float* y, int threads);  // source.py

// A row one value of which holds most of its energy (max² > 0.6 Σx²): a first token's massive
// activations after RMSNorm (Qwen2.5-Coder-1.5B's position 0: 0.77–0.92 on its qkv and gate/up
// inputs, every other position ≤ 0.31). Its int8 blocks round the rest of its block to nothing,
// which moved that position's logits by 2.1 of 21 (BENCHMARKS.md); gemm_vnni8 recomputes such
// rows on int16 with the row tiles. Only where K <= 4096: the MLP's down input (K = 8960) is that
// peaked in ordinary rows too (0.63 at the 99th percentile), and its int8 error stays small.
VNNI_TARGET bool massive_row(const float* x, int64_t K) {
  if (K > 4096) return false;
  __m512 mx = _mm512_setzero_ps(), ss = mx;
  for (int64_t i = 0; i < K; i += 16) {  // K % 32 == 0
    const __m512 v = _mm512_loadu_ps(x + i), v2 = _mm512_mul_ps(v, v);
    mx = _mm512_max_ps(mx, v2);
    ss = _mm512_add_ps(ss, v2);
  }
  return _mm512_reduce_max_ps(mx) > 0.6f * _mm512_reduce_add_ps(ss);
}

const Quantised8& quantise_rows8(const float* x, int64_t M, int64_t K, int threads) {
  q8buf.reserve(M, K);
  const int64_t G = K / QK;
  Quantised8& q = q8buf;
  q.massive.assign(M, 0);
  over_rows(M, threads, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      quantize_row8(x + m * K, K, q.q + m * K, q.d + m * G, q.s + m * G);
      q.massive[m] = massive_row(x + m * K, K);
    }
  });
  return q;
}

// GNRV weight rows as signed bytes: block g, quad p (values 4p..4p+3), output i at int32 index
// (g * 8 + p) * GNRV + i; sw[(g * SPB + h) * GNRV + i] = 128 * the sum of scale group h's codes;
// scales and mins as Panel's.
struct Panel8 {
  int32_t* w = nullptr;
  int32_t* sw = nullptr;
  float* sc = nullptr;
  float* mn = nullptr;
  int64_t cap = 0;
  void reserve(int64_t G) {
    if (G <= cap) return;
    free(w); free(sw); free(sc); free(mn);
    cap = G;
    w = (int32_t*)aligned_alloc(64, sizeof(int32_t) * 8 * GNRV * G);
    sw = (int32_t*)aligned_alloc(64, sizeof(int32_t) * 2 * GNRV * G);
    sc = (float*)aligned_alloc(64, sizeof(float) * 2 * GNRV * G);
    mn = (float*)aligned_alloc(64, sizeof(float) * GNRV * G);
  }
};
thread_local Panel8 panel8_buf;

inline int32_t sum16(__m256i v) {  // the sum of 16 int16
  const __m256i p = _mm256_madd_epi16(v, _mm256_set1_epi16(1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int F>
void pack_panel8(const Weights& W, int64_t n0, int64_t end, Panel8& P) {
  constexpr int SPB = scales_per_block(F);
  constexpr int NP = GNRV;
  const int64_t K = W.K, G = K / QK;
  alignas(32) int32_t t[NP][8];  // one block of each row: 8 quads
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < NP; ++i) {
      const int64_t n = n0 + i;
      __m256i lo = _mm256_setzero_si256(), hi = lo;
      float s = 0.0f, s1 = 0.0f, m = 0.0f;
      if (n < end) {
        load_block16<F>(W, n, g, lo, hi);
        block_params<F>(W, n, g, s, s1, m);
        if (codes_of(F) == F_Q4) {  // codes 0..15 as c - 8 (centred: half the rounding error), min + 8·scale
          lo = _mm256_sub_epi16(lo, _mm256_set1_epi16(8));
          hi = _mm256_sub_epi16(hi, _mm256_set1_epi16(8));
          m += 8.0f * s;
        }
      }
      // packs per 128-bit lane: (lo 0-7, hi 0-7 | lo 8-15, hi 8-15) -> 64-bit quarters reordered
      _mm256_store_si256((__m256i*)t[i], _mm256_permute4x64_epi64(_mm256_packs_epi16(lo, hi), 0xD8));
      const int32_t a = sum16(lo), b = sum16(hi);
      if (SPB == 2) {
        P.sw[(g * 2) * NP + i] = 128 * a;
        P.sw[(g * 2 + 1) * NP + i] = 128 * b;
        P.sc[(g * 2) * NP + i] = s;
        P.sc[(g * 2 + 1) * NP + i] = s1;
      } else {
        P.sw[g * NP + i] = 128 * (a + b);
        P.sc[g * NP + i] = s;
      }
      P.mn[g * NP + i] = m;
    }
    int32_t* dst = P.w + g * 8 * NP;
    for (int p = 0; p < 8; ++p)
      for (int i = 0; i < NP; ++i) dst[p * NP + i] = t[i][p];
  }
}

struct TileArgs8 {
  const uint8_t* q;  // activation rows, int8 + 128 [M, K]
  const float* d;
  const float* s;
  const int32_t* w;
  const int32_t* sw;
  const float* sc;
  const float* mn;
  int64_t K;
};

// One R x 32 tile on int8 activations: y[r * ldy + i] for i < cols.
template <int R, bool MIN, int SPB>
VNNI_TARGET void gemm_tile_vnni8(const TileArgs8& a, int64_t m0, const float* bias, float* y,
                                 int64_t ldy, int cols) {
  const int64_t K = a.K, G = K / QK;
  constexpr int QUADS = 8 / SPB;  // value quads per scale group
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const int32_t* w = a.w + g * 8 * GNRV;
    const uint8_t* x = a.q + m0 * K + g * QK;
    for (int h = 0; h < SPB; ++h) {
      __m512i s[R][2];
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int p = 0; p < QUADS; ++p) {
        const int32_t* wp = w + (h * QUADS + p) * GNRV;
        const __m512i w0 = _mm512_load_si512((const void*)wp);
        const __m512i w1 = _mm512_load_si512((const void*)(wp + 16));
        for (int r = 0; r < R; ++r) {
          int32_t quad;
          __builtin_memcpy(&quad, x + r * K + 4 * (h * QUADS + p), 4);
          const __m512i xb = _mm512_set1_epi32(quad);
          s[r][0] = _mm512_dpbusd_epi32(s[r][0], xb, w0);
          s[r][1] = _mm512_dpbusd_epi32(s[r][1], xb, w1);
        }
      }
      const int32_t* swp = a.sw + (g * SPB + h) * GNRV;
      const __m512i sw0 = _mm512_load_si512((const void*)swp);
      const __m512i sw1 = _mm512_load_si512((const void*)(swp + 16));
      const float* sc = a.sc + (g * SPB + h) * GNRV;
      const __m512 sc0 = _mm512_load_ps(sc), sc1 = _mm512_load_ps(sc + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_set1_ps(a.d[(m0 + r) * G + g]);
        const __m512i t0 = _mm512_sub_epi32(s[r][0], sw0), t1 = _mm512_sub_epi32(s[r][1], sw1);
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t0), _mm512_mul_ps(sc0, d), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1), _mm512_mul_ps(sc1, d), acc[r][1]);
        if (MIN && SPB == 1) {
          const __m512 xs = _mm512_set1_ps(a.s[(m0 + r) * G + g]);
          acc[r][0] = _mm512_fmadd_ps(_mm512_load_ps(a.mn + g * GNRV), xs, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(_mm512_load_ps(a.mn + g * GNRV + 16), xs, acc[r][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) {
      __m512 v = acc[r][j];
      if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * j));
      const int left = cols - 16 * j;
      if (left >= 16) _mm512_storeu_ps(y + r * ldy + 16 * j, v);
      else if (left > 0) _mm512_mask_storeu_ps(y + r * ldy + 16 * j, (__mmask16)((1u << left) - 1), v);
    }
}

template <int R, int F>
VNNI_TARGET inline void gemm_tile_vnni8_for(const TileArgs8& a, bool min, int64_t m0,
                                            const float* bias, float* y, int64_t ldy, int cols) {
  constexpr int SPB = scales_per_block(F);
  if (min) gemm_tile_vnni8<R, true, SPB>(a, m0, bias, y, ldy, cols);
  else gemm_tile_vnni8<R, false, SPB>(a, m0, bias, y, ldy, cols);
}

template <int F>
void gemm_vnni8(const float* x, int64_t M, const Weights& W, float* y, int threads) {
  const Quantised8& xq = quantise_rows8(x, M, W.K, threads);
  const int64_t N = W.ld(), K = W.K;
  const bool min = W.mins != nullptr;
  over_rows(W.N, threads, [&](int64_t n0, int64_t n1) {
    Panel8& P = panel8_buf;
    P.reserve(K / QK);
    alignas(64) float part_bias[GNRV] = {};
    const TileArgs8 a{xq.q, xq.d, xq.s, P.w, P.sw, P.sc, P.mn, K};
    for (int64_t p0 = n0; p0 < n1; p0 += GNRV) {
      pack_panel8<F>(W, p0, n1, P);
      const int cols = (int)(n1 - p0 < GNRV ? n1 - p0 : GNRV);
      const float* bias = nullptr;
      if (W.bias && cols == GNRV) bias = W.bias + p0;
      else if (W.bias) {
        for (int i = 0; i < GNRV; ++i) part_bias[i] = i < cols ? W.bias[p0 + i] : 0.0f;
        bias = part_bias;
      }
      int64_t m = 0;
      for (; m + GMR <= M; m += GMR) gemm_tile_vnni8_for<GMR, F>(a, min, m, bias, y + m * N + p0, N, cols);
      float* out = y + m * N + p0;
      switch (M - m) {
        case 3: gemm_tile_vnni8_for<3, F>(a, min, m, bias, out, N, cols); break;
        case 2: gemm_tile_vnni8_for<2, F>(a, min, m, bias, out, N, cols); break;
        case 1: gemm_tile_vnni8_for<1, F>(a, min, m, bias, out, N, cols); break;
        default: break;
      }
    }
  }, GNRV);
  for (int64_t m = 0; m < M; ++m)  // rows int8 cannot hold: on int16, as the row tiles do them
    if (xq.massive[m]) small_linear<F>(x + m * K, 1, W, y + m * N, threads);
}

extern "C" {
// The panel GEMM's activations: 1 int8 (gemm_vnni8, where the VNNI kernels run), 0 int16;
// -1 only asks. Returns the setting in effect.
int pq_set_act8(int on) {
  if (on == 0 || on == 1) g_act8 = on;
  return g_act8;
}
}  // extern "C"

"""
