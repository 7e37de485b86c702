"""The C++ of the CPU prefill attention (AVX-512; appended to ``source.KERNEL_SOURCE``):
a chunk of new tokens of one sequence attending, causally, over its paged cache.

PyTorch's SDPA reached ~50-80 GFLOP/s on this shape (12 query heads over 2 KV heads of 128,
512 new tokens over ~1000 keys) on 2 cores — ~10% of a 1.5B model's prefill. Here a work item
is one KV head and ``BQ`` query rows: its ``G`` query heads × ``BQ`` rows (≤ 48 query vectors,
three 512-bit registers a dimension) share every key and value they read. Per block of 16 keys
(converted from float16 once): scores as ``S^T[key][query]`` (a key's value broadcast against
the transposed queries: 12 independent FMA chains), the causal mask, an online softmax per
query lane (running max and sum, rescaling the output as the max grows), then the output rows
two at a time, each value row loaded once for both. Float32 throughout; the result differs
from SDPA's by summation order only (~1e-6 relative).
"""

PREFILL_ATTENTION_SOURCE = r"""
// ------------------------------------------------------------------------- prefill attention

namespace {

constexpr int PA_NQ = 48;  // query vectors per work item (3 x 16 lanes)
constexpr int PA_BK = 16;  // keys per block

VNNI_TARGET inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

struct PrefillArgs {
  const float* q; int64_t q_stride;   // the chunk's first query row; rows q_stride apart
  int64_t T, C;                       // new tokens, context after them (query i sees keys <= C - T + i)
  const int64_t* table; int64_t block_size;
  int64_t Hq, Hk, D;
  const void* k_cache; const void* v_cache;  // [slots, Hk, D], float32 or float16 bits
  float scale; float* out; int64_t out_stride;
  int64_t bq;                         // query rows per work item (G * bq <= PA_NQ)
};

struct PrefillScratch {
  alignas(64) float qt[256 * PA_NQ];      // queries transposed: [d][query], pre-scaled
  alignas(64) float kb[PA_BK * 256];      // a key block, float32
  alignas(64) float vb[PA_BK * 256];
  alignas(64) float s[PA_BK * PA_NQ];     // scores, then probabilities: [key][query]
  alignas(64) float o[PA_NQ * 256];       // output accumulators: [query][d]
  alignas(64) float corr[PA_NQ];
};
thread_local PrefillScratch* pa_scratch = nullptr;

template <typename T>
VNNI_TARGET inline void load_row(const T* src, float* dst, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) {
    if constexpr (sizeof(T) == 2)
      _mm512_store_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + d))));
    else
      _mm512_store_ps(dst + d, _mm512_loadu_ps((const float*)src + d));
  }
}

// One work item: KV head h, query rows [i0, i1). DV = D / 16.
template <typename T, int DV>
VNNI_TARGET void prefill_item(const PrefillArgs& a, int64_t h, int64_t i0, int64_t i1) {
  if (!pa_scratch) pa_scratch = (PrefillScratch*)aligned_alloc(64, sizeof(PrefillScratch));
  PrefillScratch& w = *pa_scratch;
  constexpr int64_t D = DV * 16;
  const int64_t G = a.Hq / a.Hk, nq = (i1 - i0) * G, offset = a.C - a.T, bs = a.block_size;
  const int64_t row = a.Hk * D;  // values per cache slot
  if (nq < PA_NQ)  // padding lanes: zero queries
    for (int64_t i = 0; i < D * PA_NQ; i += 16) _mm512_store_ps(w.qt + i, _mm512_setzero_ps());
  for (int64_t r = 0; r < i1 - i0; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = a.q + (i0 + r) * a.q_stride + (h * G + g) * D;
      const int64_t qi = r * G + g;
      for (int64_t d = 0; d < D; ++d) w.qt[d * PA_NQ + qi] = src[d] * a.scale;
    }
  __m512 pos[3], m[3], l[3];
  for (int v = 0; v < 3; ++v) {
    alignas(64) float p[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t qi = 16 * v + i;
      p[i] = (float)(offset + i0 + (qi < nq ? qi / G : 0));
    }
    pos[v] = _mm512_load_ps(p);
    m[v] = _mm512_set1_ps(-__builtin_inff());
    l[v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < nq * D; i += 16) _mm512_store_ps(w.o + i, _mm512_setzero_ps());
  const int64_t nkeys = offset + i1;  // the last row sees keys 0 .. offset + i1 - 1
  for (int64_t j0 = 0; j0 < nkeys; j0 += PA_BK) {
    const int64_t nb = nkeys - j0 < PA_BK ? nkeys - j0 : PA_BK;
    for (int64_t j = 0; j < PA_BK; ++j) {
      if (j < nb) {
        const int64_t p = j0 + j, slot = a.table[p / bs] * bs + p % bs;
        load_row((const T*)a.k_cache + slot * row + h * D, w.kb + j * D, D);
        load_row((const T*)a.v_cache + slot * row + h * D, w.vb + j * D, D);
      } else {
        for (int64_t d = 0; d < D; d += 16) {
          _mm512_store_ps(w.kb + j * D + d, _mm512_setzero_ps());
          _mm512_store_ps(w.vb + j * D + d, _mm512_setzero_ps());
        }
      }
    }
    // scores S^T[j][q] = k_j . q (q pre-scaled), four keys at a time
    for (int64_t j = 0; j < PA_BK; j += 4) {
      __m512 acc[4][3];
      for (int k = 0; k < 4; ++k) acc[k][0] = acc[k][1] = acc[k][2] = _mm512_setzero_ps();
      const float* kr = w.kb + j * D;
#pragma GCC unroll 4
      for (int64_t d = 0; d < D; ++d) {
        const __m512 q0 = _mm512_load_ps(w.qt + d * PA_NQ), q1 = _mm512_load_ps(w.qt + d * PA_NQ + 16),
                     q2 = _mm512_load_ps(w.qt + d * PA_NQ + 32);
        for (int k = 0; k < 4; ++k) {
          const __m512 kv = _mm512_set1_ps(kr[k * D + d]);
          acc[k][0] = _mm512_fmadd_ps(kv, q0, acc[k][0]);
          acc[k][1] = _mm512_fmadd_ps(kv, q1, acc[k][1]);
          acc[k][2] = _mm512_fmadd_ps(kv, q2, acc[k][2]);
        }
      }
      for (int k = 0; k < 4; ++k) {
        const __m512 key = _mm512_set1_ps((float)(j0 + j + k));
        for (int v = 0; v < 3; ++v) {  // causal: key position > query position → -inf
          const __mmask16 hide = _mm512_cmp_ps_mask(key, pos[v], _CMP_GT_OQ);
          _mm512_store_ps(w.s + (j + k) * PA_NQ + 16 * v,
                          _mm512_mask_blend_ps(hide, acc[k][v], _mm512_set1_ps(-__builtin_inff())));
        }
      }
    }
    for (int v = 0; v < 3; ++v) {  // online softmax per query lane
      __m512 mx = m[v];
      for (int64_t j = 0; j < nb; ++j) mx = _mm512_max_ps(mx, _mm512_load_ps(w.s + j * PA_NQ + 16 * v));
      const __m512 corr = exp512(_mm512_sub_ps(m[v], mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < PA_BK; ++j) {
        float* sp = w.s + j * PA_NQ + 16 * v;
        const __m512 sv = _mm512_load_ps(sp);  // a masked key (-inf) gets exactly 0
        const __mmask16 seen = _mm512_cmp_ps_mask(sv, _mm512_set1_ps(-__builtin_inff()), _CMP_NEQ_OQ);
        const __m512 p = j < nb ? _mm512_maskz_mov_ps(seen, exp512(_mm512_sub_ps(sv, mx))) : _mm512_setzero_ps();
        _mm512_store_ps(sp, p);
        sum = _mm512_add_ps(sum, p);
      }
      l[v] = _mm512_fmadd_ps(l[v], corr, sum);
      m[v] = mx;
      _mm512_store_ps(w.corr + 16 * v, corr);
    }
    // o[q] = o[q] * corr[q] + sum_j p[j][q] v_j, two queries at a time
    for (int64_t qi = 0; qi < nq; qi += 2) {
      const bool two = qi + 1 < nq;
      __m512 o0[DV], o1[DV];
      const __m512 c0 = _mm512_set1_ps(w.corr[qi]), c1 = _mm512_set1_ps(two ? w.corr[qi + 1] : 0.0f);
      for (int d = 0; d < DV; ++d) {
        o0[d] = _mm512_mul_ps(_mm512_load_ps(w.o + qi * D + 16 * d), c0);
        o1[d] = two ? _mm512_mul_ps(_mm512_load_ps(w.o + (qi + 1) * D + 16 * d), c1) : _mm512_setzero_ps();
      }
      for (int64_t j = 0; j < nb; ++j) {
        const __m512 p0 = _mm512_set1_ps(w.s[j * PA_NQ + qi]);
        const __m512 p1 = _mm512_set1_ps(w.s[j * PA_NQ + qi + 1]);
        const float* vr = w.vb + j * D;
        for (int d = 0; d < DV; ++d) {
          const __m512 vv = _mm512_load_ps(vr + 16 * d);
          o0[d] = _mm512_fmadd_ps(p0, vv, o0[d]);
          o1[d] = _mm512_fmadd_ps(p1, vv, o1[d]);
        }
      }
      for (int d = 0; d < DV; ++d) {
        _mm512_store_ps(w.o + qi * D + 16 * d, o0[d]);
        if (two) _mm512_store_ps(w.o + (qi + 1) * D + 16 * d, o1[d]);
      }
    }
  }
  alignas(64) float lsum[PA_NQ];
  for (int v = 0; v < 3; ++v) _mm512_store_ps(lsum + 16 * v, l[v]);
  for (int64_t r = 0; r < i1 - i0; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t qi = r * G + g;
      const __m512 inv = _mm512_set1_ps(1.0f / lsum[qi]);
      float* dst = a.out + (i0 + r) * a.out_stride + (h * G + g) * D;
      for (int d = 0; d < DV; ++d)
        _mm512_storeu_ps(dst + 16 * d, _mm512_mul_ps(_mm512_load_ps(w.o + qi * D + 16 * d), inv));
    }
}

template <typename T, int DV>
void prefill_run(const PrefillArgs& a, int threads) {
  const int64_t tiles = (a.T + a.bq - 1) / a.bq, items = a.Hk * tiles;
  auto body = [&](int64_t i) {
    // the longest rows (most keys) first: items are claimed in order
    const int64_t t = tiles - 1 - i / a.Hk, h = i % a.Hk;
    const int64_t i0 = t * a.bq, i1 = i0 + a.bq < a.T ? i0 + a.bq : a.T;
    prefill_item<T, DV>(a, h, i0, i1);
  };
  using Body = decltype(body);
  pool().run(items, [](void* c, int64_t i) { (*(Body*)c)(i); }, &body, threads);
}

}  // namespace

extern "C" {

// out rows [0, T) = attention of the chunk's T query rows (q, rows q_stride apart, heads of D)
// over the sequence's C cached keys (the chunk's own K/V already stored; query i sees keys
// 0 .. C - T + i) whose blocks are `table`. Returns 0 where it ran, -1 where it does not
// apply (no AVX-512, D not 64 or 128, more than 48 query heads per KV head): use SDPA then.
int pq_prefill_attention(const float* q, int64_t q_stride, int64_t T, int64_t C,
                         const int64_t* table, int64_t block_size, int64_t Hq, int64_t Hk,
                         int64_t D, const void* k_cache, const void* v_cache, float scale,
                         float* out, int64_t out_stride, int threads, int kv_half) {
  const int64_t G = Hq / Hk;
  if (!g_vnni || (D != 64 && D != 128) || G < 1 || G > PA_NQ || Hq % Hk) return -1;
  const PrefillArgs a{q, q_stride, T, C, table, block_size, Hq, Hk, D, k_cache, v_cache,
                      scale, out, out_stride, PA_NQ / G};
  if (kv_half) {
    if (D == 128) prefill_run<uint16_t, 8>(a, threads);
    else prefill_run<uint16_t, 4>(a, threads);
  } else {
    if (D == 128) prefill_run<float, 8>(a, threads);
    else prefill_run<float, 4>(a, threads);
  }
  return 0;
}

}  // extern "C"
"""
