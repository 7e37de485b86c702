"""The C++ of the bf16 dequantisation for prefill (appended to ``source.KERNEL_SOURCE``).

``pqx_dequant_bf16`` writes rows ``[n0, n1)`` of a projection (row blocks in any code format,
``Proj``) as bfloat16 ``[n1 - n0, K]``, one pass over the codes, threaded over the kernels'
pool. Each value is the float the float32 dequantisation (``pqx_dequant``) gives —
``code · scale + min`` in one fused multiply-add, exact since a code times a float16 scale
fits in 24 bits — rounded to bfloat16 to nearest even (as ``tensor.bfloat16()``; weights
hold no NaN). The AVX-512 BF16 variant (``vcvtne2ps2bf16``, 32 values a block) is compiled
with a target attribute and chosen at run time by ``__builtin_cpu_supports``; elsewhere
AVX2 rounds with integer adds. ``bf16_prefill.py`` feeds the result to one oneDNN matmul.
"""

BF16_SOURCE = r"""
#include <algorithm>

namespace {

// 8 floats -> 8 bfloat16, rounding to nearest even (finite values)
inline __m128i bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// 16 codes (int8, or q4 values already unpacked to bytes) -> 16 bf16 code * s + m
inline void bf16_scaled16(__m128i b, __m256 s, __m256 m, uint16_t* o, bool u4) {
  const __m128i b8 = _mm_srli_si128(b, 8);
  const __m256 lo = _mm256_cvtepi32_ps(u4 ? _mm256_cvtepu8_epi32(b) : _mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(u4 ? _mm256_cvtepu8_epi32(b8) : _mm256_cvtepi8_epi32(b8));
  _mm_storeu_si128((__m128i*)o, bf16x8(_mm256_fmadd_ps(lo, s, m)));
  _mm_storeu_si128((__m128i*)(o + 8), bf16x8(_mm256_fmadd_ps(hi, s, m)));
}

// 16 int16 codes -> 16 bf16 code * s
inline void bf16_scaled_i16(__m256i v, __m256 s, uint16_t* o) {
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
  _mm_storeu_si128((__m128i*)o, bf16x8(_mm256_mul_ps(lo, s)));
  _mm_storeu_si128((__m128i*)(o + 8), bf16x8(_mm256_mul_ps(hi, s)));
}

template <int F>
void dequant_bf16_avx2(const Weights& W, int64_t n0, int64_t n1, uint16_t* out) {
  const int64_t K = W.K, G = K / QK;
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      float fs, fs1, fm;
      block_params<F>(W, n, g, fs, fs1, fm);
      const __m256 s = _mm256_set1_ps(fs), s1 = _mm256_set1_ps(fs1), m = _mm256_set1_ps(fm);
      uint16_t* o = out + (n - n0) * K + g * QK;
      if (F == F_Q6) {
        __m256i lo, hi;
        load_block16<F>(W, n, g, lo, hi);
        bf16_scaled_i16(lo, s, o);
        bf16_scaled_i16(hi, s1, o + 16);
      } else if (codes_of(F) != F_Q4) {
        const uint8_t* c = W.codes + n * K + g * QK;
        bf16_scaled16(_mm_loadu_si128((const __m128i*)c), s, m, o, false);
        bf16_scaled16(_mm_loadu_si128((const __m128i*)(c + 16)), s1, m, o + 16, false);
      } else {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(W.codes + n * (K / 2) + g * 16));
        bf16_scaled16(_mm_and_si128(raw, m4), s, m, o, true);
        bf16_scaled16(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), s, m, o + 16, true);
      }
    }
}

template <int F>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dequant_bf16_avx512(const Weights& W, int64_t n0, int64_t n1, uint16_t* out) {
  const int64_t K = W.K, G = K / QK;
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      float fs, fs1, fm;
      block_params<F>(W, n, g, fs, fs1, fm);
      const __m512 s = _mm512_set1_ps(fs), s1 = _mm512_set1_ps(fs1), m = _mm512_set1_ps(fm);
      __m512 lo, hi;
      if (F == F_Q6) {
        __m256i l16, h16;
        load_block16<F>(W, n, g, l16, h16);
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(l16));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(h16));
      } else if (codes_of(F) != F_Q4) {
        const uint8_t* c = W.codes + n * K + g * QK;
        lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)c)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(c + 16))));
      } else {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(W.codes + n * (K / 2) + g * 16));
        lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, m4)));
        hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), m4)));
      }
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s1, m), _mm512_fmadd_ps(lo, s, m));
      _mm512_storeu_si512((void*)(out + (n - n0) * K + g * QK), (__m512i)v);
    }
}

bool has_avx512_bf16() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return yes;
}

template <int F>
void dequant_bf16(const Weights& W, int64_t n0, int64_t n1, uint16_t* out, int isa) {
  if (isa == 1) dequant_bf16_avx512<F>(W, n0, n1, out);
  else dequant_bf16_avx2<F>(W, n0, n1, out);
}

}  // namespace

extern "C" {

// Which dequant_bf16 variant runs here: 1 AVX-512 BF16, 0 AVX2.
int pqx_bf16_isa() { return has_avx512_bf16() ? 1 : 0; }

// out[n1 - n0, K] = rows [n0, n1) of a projection's weights as bfloat16 (isa: -1 the best
// this CPU has, 0 AVX2 — for tests).
void pqx_dequant_bf16(const Proj* p, int64_t n0, int64_t n1, uint16_t* out, int threads, int isa) {
  if (isa < 0 || (isa == 1 && !has_avx512_bf16())) isa = pqx_bf16_isa();
  const int64_t K = p->K;
  over_rows(n1 - n0, threads, [&](int64_t a, int64_t b) {
    int64_t start = 0;  // first row of part i in the projection
    for (int64_t i = 0; i < p->n_parts; ++i) {
      const Part& q = p->part[i];
      const int64_t lo = std::max(n0 + a, start), hi = std::min(n0 + b, start + q.rows);
      if (lo < hi) {
        const Weights W{q.codes, q.scales, q.mins, nullptr, K, q.rows};
        uint16_t* o = out + (lo - n0) * K;
        if (q.fmt == F_Q4) dequant_bf16<F_Q4>(W, lo - start, hi - start, o, isa);
        else if (q.fmt == F_Q4K) dequant_bf16<F_Q4K>(W, lo - start, hi - start, o, isa);
        else if (q.fmt == F_Q8) dequant_bf16<F_Q8>(W, lo - start, hi - start, o, isa);
        else if (q.fmt == F_Q6) dequant_bf16<F_Q6>(W, lo - start, hi - start, o, isa);
        else dequant_bf16<F_Q8G16>(W, lo - start, hi - start, o, isa);
      }
      start += q.rows;
    }
  });
}

}  // extern "C"
"""
