"""The C++ source of the CPU weight-only kernels (AVX2 + FMA + F16C, threads over output rows).

Formats (blocks of 32 along the input dimension K, ``G = K / 32`` blocks per row):

* q4: ``codes [N, K/2]`` uint8, byte ``j`` of a block holds value ``j`` in its low nibble and
  value ``j + 16`` in its high nibble (GGUF's Q4_0/Q4_1 order); ``scales``/``mins [N, G]``
  float16; ``w = code · scale + min``.
* q8: ``codes [N, K]`` int8 in −127..127, ``scales [N, G]`` float16; ``w = code · scale``
  (GGUF's Q8_0); ``codes_linear.py`` lists the other int8-code formats and Q6_K's packed
  6-bit one (``F_Q6``, unpacked by ``q6_unpack``).

Activations are quantised once per call to int16 per 32-block (``x ≈ d·q``, ``d = max|x| /
32767``), so the inner loop is integer multiply-adds (``madd_epi16``) and one float FMA per
block; the q4 ``min`` term needs no products: ``Σ x·(c·s + m) = s·d·Σ q·c + m·Σ x``, with
``Σ x`` the exact float block sum. int16 rather than llama.cpp's int8 activations: the
results match float32 matmuls to ~2e-5 (int8: ~5e-3, 93% top-1 agreement with float on
the default model), for ~10% of decode matmul time (decode is memory-bound; on AVX2 without
VNNI the int8 path needs ``maddubs`` + ``madd`` + sign tricks, not much cheaper).

Instruction sets: this file's kernels are AVX2; ``vnni_source.py`` and ``vnni_gemm_source.py``
hold the same tiles on AVX-512 VNNI (``vpdpwssd`` on the same int16 activations: the same
exact block sums), compiled per function for that target and run only where the CPU has it
(``pq_set_isa``, chosen by ``build.default_isa``).

Threads: a small work-sharing pool of its own (``pool_source.py``, no OpenMP), which never
waits for a worker that has not started — on a loaded 2-core machine (load average 7) an
OpenMP region per matmul cost a scheduler time slice, ~15 ms per call.

Kept as a string (as ``torch.utils.cpp_extension.load_inline`` would) so that a wheel carries
it without package-data configuration; ``build.py`` compiles it once per source/compiler and
caches the library. It has a plain C ABI and no PyTorch headers: it compiles in ~3 s on a
loaded 2-core machine, where an extension including ``torch/extension.h`` takes a minute.
"""

from pensieve.backends.cpu_quant.bf16_source import BF16_SOURCE
from pensieve.backends.cpu_quant.gemm_source import GEMM_ENTRY_POINTS, GEMM_SOURCE
from pensieve.backends.cpu_quant.layer_source import LAYER_SOURCE
from pensieve.backends.cpu_quant.moe_layer_source import MOE_LAYER_ENTRY
from pensieve.backends.cpu_quant.moe_rows_source import MOE_ROWS_ENTRY, MOE_ROWS_SOURCE
from pensieve.backends.cpu_quant.pool_source import POOL_SOURCE
from pensieve.backends.cpu_quant.prefill_attention_source import PREFILL_ATTENTION_SOURCE
from pensieve.backends.cpu_quant.swiglu_gemm_source import SWIGLU_GEMM_SOURCE
from pensieve.backends.cpu_quant.vnni_gemm_source import VNNI_GEMM_SOURCE
from pensieve.backends.cpu_quant.vnni_source import VNNI_SOURCE

KERNEL_SOURCE = POOL_SOURCE + r"""
constexpr int64_t QK = 32;      // values per block
constexpr int MR = 4;           // activation rows per inner kernel when M >= 4
constexpr int64_t PF_ROWS = 8;  // software prefetch distance, in weight rows

// ------------------------------------------------------------------------- activations

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row of K floats -> K/32 int16 blocks q with scales d (x ~ d*q, d = max|x| / 32767) and
// the exact float block sums s.
void quantize_row(const float* x, int64_t K, int16_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = 0; g < K / QK; ++g) {
    const float* b = x + g * QK;
    const __m256 v0 = _mm256_loadu_ps(b), v1 = _mm256_loadu_ps(b + 8);
    const __m256 v2 = _mm256_loadu_ps(b + 16), v3 = _mm256_loadu_ps(b + 24);
    const __m256 a = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
        _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    const float amax = hmax(a);
    d[g] = amax / 32767.0f;
    s[g] = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
    const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
    const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    // packs works per 128-bit lane (i0a i1a | i0b i1b): put the 64-bit quarters back in order
    _mm256_storeu_si256((__m256i*)(q + g * QK),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8));
    _mm256_storeu_si256((__m256i*)(q + g * QK + 16),
                        _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8));
  }
}

// Activations of one call, quantised; a per-thread buffer that only grows.
struct Quantised {
  int16_t* q = nullptr;
  float* d = nullptr;
  float* s = nullptr;
  int64_t cap = 0;
  void reserve(int64_t M, int64_t K) {
    if (M * K <= cap) return;
    free(q); free(d); free(s);
    cap = M * K;
    q = (int16_t*)aligned_alloc(64, ((cap * 2 + 63) / 64) * 64);
    d = (float*)malloc(sizeof(float) * (cap / QK + 1));
    s = (float*)malloc(sizeof(float) * (cap / QK + 1));
  }
};
thread_local Quantised qbuf;

const Quantised& quantise(const float* x, int64_t M, int64_t K) {
  qbuf.reserve(M, K);
  const int64_t G = K / QK;
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x + m * K, K, qbuf.q + m * K, qbuf.d + m * G, qbuf.s + m * G);
  return qbuf;
}

// ------------------------------------------------------------------------- matmul

// Code formats (``Part::fmt``): q4 nibbles with float16 scales and mins per 32; int8 codes
// with a scale (and optionally a min) per 32; int8 codes with a scale per 16 and no mins;
// 6-bit codes (Q6_K's -32..31) packed 24 bytes a block with the file's own super-block scales
// (per 256: float16 d, then 16 int8 sub-scales: a scale per 16 is d * sc); q4 nibbles with
// Q4_K's own super-block scales (F_Q4K: per 256, the file's 12 bytes of 6-bit scales and
// mins in ``scales`` and float16 d, dmin in ``mins``; w = d * sc * q - dmin * m per 32).
// The super-block scales are the file's integers, applied in float32 where d * sc is exact
// (an 11-bit mantissa times at most 8 bits): the weights are the file's, bit for bit.
enum : int { F_Q4 = 0, F_Q8 = 1, F_Q8G16 = 2, F_Q6 = 3, F_Q4K = 4 };

struct Weights {
  const uint8_t* codes;    // q4: [N, K/2] nibbles; q8: [N, K] int8; q6: [N, K/32 * 24]
  const uint16_t* scales;  // [N, G] float16 ([N, 2G] for F_Q8G16); F_Q6: [N, K/256 * 18]
                           // bytes; F_Q4K: [N, K/256 * 12] bytes
  const uint16_t* mins;    // [N, G] float16, or null (q4 always has them); F_Q4K: [N, K/256 * 2]
                           // float16 (d, dmin)
  const float* bias;       // [N] or null
  int64_t K, N;
  int64_t ldy = 0;         // output row stride (0: N)
  int64_t ld() const { return ldy ? ldy : N; }
};

constexpr int codes_of(int F) { return F == F_Q4K ? F_Q4 : F; }  // the code layout of F
constexpr int scales_per_block(int F) { return F == F_Q8G16 || F == F_Q6 ? 2 : 1; }
constexpr int64_t block_bytes(int F) { return codes_of(F) == F_Q4 ? 16 : F == F_Q6 ? 24 : 32; }
constexpr int64_t Q6_SB = 18, Q4K_SB = 12;  // super-block scale bytes (F_Q6, F_Q4K)
// A row's scales and mins, in uint16 units (what a row offset of those pointers moves by).
constexpr int64_t scale_row(int F, int64_t K) {
  return F == F_Q6 ? K / 256 * Q6_SB / 2 : F == F_Q4K ? K / 256 * Q4K_SB / 2
                                                      : K / 32 * scales_per_block(F);
}
constexpr int64_t min_row(int F, int64_t K) { return F == F_Q4K ? K / 256 * 2 : K / 32; }

// Every cache line of [p, p + bytes) (a row's super-block scales need not start on a line).
inline void prefetch_span(const void* p, int64_t bytes) {
  const uintptr_t end = (uintptr_t)p + bytes;
  for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a < end; a += 64) _mm_prefetch((const char*)a, _MM_HINT_T0);
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  __builtin_memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Q4_K's 12 bytes of 6-bit scales and mins (sub-blocks 0..7 of a super-block) as bytes: the
// scales in the low 8 bytes, the mins in the high 8. Sub-blocks 0-3 keep the low 6 bits of
// bytes 0-3 (scales) and 4-7 (mins); 4-7 take a nibble of bytes 8-11 and, as their top two
// bits, the top bits of bytes 0-3 (scales) or 4-7 (mins).
inline void k4_unpack(const uint8_t* q, uint64_t& sc, uint64_t& mn) {
  uint32_t u0, u1, u2;
  __builtin_memcpy(&u0, q, 4);
  __builtin_memcpy(&u1, q + 4, 4);
  __builtin_memcpy(&u2, q + 8, 4);
  const uint32_t lo6 = 0x3F3F3F3Fu, lo4 = 0x0F0F0F0Fu, lo2 = 0x03030303u;
  sc = (uint64_t)(u0 & lo6) | (uint64_t)((u2 & lo4) | ((u0 >> 6) & lo2) << 4) << 32;
  mn = (uint64_t)(u1 & lo6) | (uint64_t)(((u2 >> 4) & lo4) | ((u1 >> 6) & lo2) << 4) << 32;
}

// Block g of weight row n: its scale s (s1: the second half's, group-16 formats) and min m.
template <int F>
inline void block_params(const Weights& W, int64_t n, int64_t g, float& s, float& s1, float& m) {
  const int64_t G = W.K / QK;
  if (F == F_Q4K) {
    const int64_t sb = n * (G / 8) + g / 8;
    uint64_t sc, mn;
    k4_unpack((const uint8_t*)W.scales + sb * Q4K_SB, sc, mn);
    const int j = (int)(g & 7) * 8;
    s = _cvtsh_ss(W.mins[2 * sb]) * (float)((sc >> j) & 0xFF);
    m = -(_cvtsh_ss(W.mins[2 * sb + 1]) * (float)((mn >> j) & 0xFF));
    s1 = s;
  } else if (F == F_Q6) {
    const uint8_t* p = (const uint8_t*)W.scales + (n * (G / 8) + g / 8) * Q6_SB;
    const float d = half_at(p);
    s = d * (float)(int8_t)p[2 + 2 * (g & 7)];
    s1 = d * (float)(int8_t)p[3 + 2 * (g & 7)];
    m = 0.0f;
  } else {
    constexpr int SPB = scales_per_block(F);
    s = _cvtsh_ss(W.scales[n * G * SPB + g * SPB]);
    s1 = SPB == 2 ? _cvtsh_ss(W.scales[n * G * SPB + g * SPB + 1]) : s;
    m = W.mins ? _cvtsh_ss(W.mins[n * G + g]) : 0.0f;
  }
}

// F_Q6's block of 32 codes c = u - 32 (u in 0..63): bytes 0..15 hold u_j & 15 in the low
// nibble of byte j and u_{j+16} & 15 in its high nibble (the q4 order), bytes 16..23 the top
// two bits of u_j, u_{j+8}, u_{j+16}, u_{j+24} in bits 0-1, 2-3, 4-5, 6-7 of byte 16 + j.
// Unpacked: values 0..15 (lo) and 16..31 (hi) as int16.
inline void q6_unpack(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
  const __m128i h8 = _mm_loadl_epi64((const __m128i*)(p + 16));
  const __m256i h = _mm256_cvtepu8_epi16(_mm_unpacklo_epi64(h8, h8));  // [h0..h7, h0..h7]
  const __m256i three = _mm256_set1_epi16(3), m4 = _mm256_set1_epi16(15);
  const __m256i off = _mm256_set1_epi16(32);
  const __m256i ha = _mm256_and_si256(_mm256_blend_epi32(h, _mm256_srli_epi16(h, 2), 0xF0), three);
  const __m256i hb = _mm256_and_si256(
      _mm256_blend_epi32(_mm256_srli_epi16(h, 4), _mm256_srli_epi16(h, 6), 0xF0), three);
  lo = _mm256_sub_epi16(_mm256_or_si256(_mm256_and_si256(b, m4), _mm256_slli_epi16(ha, 4)), off);
  hi = _mm256_sub_epi16(_mm256_or_si256(_mm256_srli_epi16(b, 4), _mm256_slli_epi16(hb, 4)), off);
}

// Values 0..15 (lo) and 16..31 (hi) of block g of weight row n in format F, as int16.
template <int F>
inline void load_block16(const Weights& W, int64_t n, int64_t g, __m256i& lo, __m256i& hi) {
  const uint8_t* c = W.codes + (n * (W.K / QK) + g) * block_bytes(F);
  if (codes_of(F) == F_Q4) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)c));
    lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(b, 4);
  } else if (F == F_Q6) {
    q6_unpack(c, lo, hi);
  } else {
    lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)c));
    hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(c + 16)));
  }
}

// prod[g] = weight scale[g] * activation scale[g]; returns (for q4, wm != null) the min term
// sum_g min[g] * activation block sum[g].
inline float prepare(const uint16_t* ws, const uint16_t* wm, const float* xd, const float* xs,
                     int64_t G, float* prod) {
  __m256 macc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + g)));
    _mm256_storeu_ps(prod + g, _mm256_mul_ps(sc, _mm256_loadu_ps(xd + g)));
    if (wm) {
      const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(wm + g)));
      macc = _mm256_fmadd_ps(mn, _mm256_loadu_ps(xs + g), macc);
    }
  }
  float mterm = hsum(macc);
  for (; g < G; ++g) {
    prod[g] = _cvtsh_ss(ws[g]) * xd[g];
    if (wm) mterm += _cvtsh_ss(wm[g]) * xs[g];
  }
  return mterm;
}

// Group-16 scales (two per 32-block, no mins): prod[2g + h] = scale[2g + h] * activation scale[g].
inline void prepare16(const uint16_t* ws, const float* xd, int64_t G, float* prod) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ws + 2 * g)));
    const __m256 d = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(xd + g)), dup);
    _mm256_storeu_ps(prod + 2 * g, _mm256_mul_ps(sc, d));
  }
  for (; g < G; ++g) {
    prod[2 * g] = _cvtsh_ss(ws[2 * g]) * xd[g];
    prod[2 * g + 1] = _cvtsh_ss(ws[2 * g + 1]) * xd[g];
  }
}

// Every block's scale(s) and min of weight row n (null W: zeros), as a panel holds them:
// sc[(g * SPB + h) * stride], mn[g * stride]. A super-block's scales are unpacked once.
template <int F>
inline void row_params(const Weights* W, int64_t n, int64_t G, float* sc, float* mn, int64_t stride) {
  constexpr int SPB = scales_per_block(F);
  if (!W) {
    for (int64_t g = 0; g < G; ++g) {
      for (int h = 0; h < SPB; ++h) sc[(g * SPB + h) * stride] = 0.0f;
      mn[g * stride] = 0.0f;
    }
  } else if (F == F_Q4K) {
    const uint8_t* q = (const uint8_t*)(W->scales + n * scale_row(F, W->K));
    const uint16_t* dm = W->mins + n * min_row(F, W->K);
    for (int64_t g = 0; g < G; g += 8, q += Q4K_SB, dm += 2) {
      uint64_t s8, m8;
      k4_unpack(q, s8, m8);
      const float d = _cvtsh_ss(dm[0]), dmin = _cvtsh_ss(dm[1]);
      for (int j = 0; j < 8; ++j) {
        sc[(g + j) * stride] = d * (float)((s8 >> (8 * j)) & 0xFF);
        mn[(g + j) * stride] = -(dmin * (float)((m8 >> (8 * j)) & 0xFF));
      }
    }
  } else if (F == F_Q6) {
    const uint8_t* p = (const uint8_t*)(W->scales + n * scale_row(F, W->K));
    for (int64_t g = 0; g < G; g += 8, p += Q6_SB) {
      const float d = half_at(p);
      for (int j = 0; j < 16; ++j) sc[(2 * g + j) * stride] = d * (float)(int8_t)p[2 + j];
      for (int j = 0; j < 8; ++j) mn[(g + j) * stride] = 0.0f;
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      float s, s1, m;
      block_params<F>(*W, n, g, s, s1, m);
      sc[g * SPB * stride] = s;
      if (SPB == 2) sc[(g * SPB + 1) * stride] = s1;
      mn[g * stride] = m;
    }
  }
}

// F_Q6's super-block scales: prod[2g + h] = d * sc[2g + h] * activation scale[g] (G % 8 == 0).
inline void prepare_q6(const uint8_t* sb, const float* xd, int64_t G, float* prod) {
  const __m256i dup_lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i dup_hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
  for (int64_t g = 0; g < G; g += 8, sb += Q6_SB) {
    const __m256 d = _mm256_set1_ps(half_at(sb));
    const __m128i sc = _mm_loadu_si128((const __m128i*)(sb + 2));
    const __m256 x = _mm256_loadu_ps(xd + g);
    const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc));
    const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)));
    _mm256_storeu_ps(prod + 2 * g, _mm256_mul_ps(_mm256_mul_ps(a, d), _mm256_permutevar8x32_ps(x, dup_lo)));
    _mm256_storeu_ps(prod + 2 * g + 8, _mm256_mul_ps(_mm256_mul_ps(b, d), _mm256_permutevar8x32_ps(x, dup_hi)));
  }
}

// F_Q4K's super-block scales: prod[g] = d * sc[g] * activation scale[g]; returns the min
// term -sum_g dmin * m[g] * activation block sum[g] (G % 8 == 0).
inline float prepare_q4k(const uint8_t* q, const uint16_t* dm, const float* xd, const float* xs,
                         int64_t G, float* prod) {
  __m256 macc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g += 8, q += Q4K_SB, dm += 2) {
    uint64_t sc, mn;
    k4_unpack(q, sc, mn);
    const __m256 s = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)));
    const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn)));
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(dm[0])), dmin = _mm256_set1_ps(_cvtsh_ss(dm[1]));
    _mm256_storeu_ps(prod + g, _mm256_mul_ps(_mm256_mul_ps(s, d), _mm256_loadu_ps(xd + g)));
    macc = _mm256_fnmadd_ps(_mm256_mul_ps(m, dmin), _mm256_loadu_ps(xs + g), macc);
  }
  return hsum(macc);
}

// The block factors of weight row n against one activation row (scales xd, block sums xs):
// prod as prepare / prepare16 write it; returns the min term.
template <int F>
inline float prepare_row(const Weights& W, int64_t n, const float* xd, const float* xs, float* prod) {
  const int64_t G = W.K / QK;
  if (F == F_Q6) {
    prepare_q6((const uint8_t*)(W.scales + n * scale_row(F, W.K)), xd, G, prod);
    return 0.0f;
  }
  if (F == F_Q4K)
    return prepare_q4k((const uint8_t*)(W.scales + n * scale_row(F, W.K)), W.mins + n * min_row(F, W.K),
                       xd, xs, G, prod);
  if (scales_per_block(F) == 2) {
    prepare16(W.scales + n * 2 * G, xd, G, prod);
    return 0.0f;
  }
  return prepare(W.scales + n * G, W.mins ? W.mins + n * G : nullptr, xd, xs, G, prod);
}

// The part of a row tile both instruction sets share: prefetch rows PF_ROWS ahead, and per
// (weight row, activation row) the block factors prod (weight scale x activation scale) and
// the min term.
template <int NR, int R, int F>
inline void tile_prologue(const Weights& W, int64_t n0, const Quantised& xq, int64_t m0,
                          float* prod, float (&mterm)[NR][R]) {
  constexpr int SPB = scales_per_block(F);
  const int64_t K = W.K, G = K / QK, row_bytes = G * block_bytes(F), SG = G * SPB;
  const int64_t SR = scale_row(F, K), MR_ = min_row(F, K);
  // each row is its own stream (plus its scales), more than the hardware prefetcher follows
  // well: prefetching PF_ROWS ahead is worth ~30% of decode matmul time
  if (n0 + PF_ROWS + NR <= W.N) {
    const char* ahead = (const char*)(W.codes + (n0 + PF_ROWS) * row_bytes);
    for (int64_t b = 0; b < NR * row_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    prefetch_span(W.scales + (n0 + PF_ROWS) * SR, NR * SR * 2);
    if (W.mins) prefetch_span(W.mins + (n0 + PF_ROWS) * MR_, NR * MR_ * 2);
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r)
      mterm[j][r] = prepare_row<F>(W, n0 + j, xq.d + (m0 + r) * G, xq.s + (m0 + r) * G,
                                   prod + (j * R + r) * SG);
}

// y[r * ldy + j] for NR weight rows n0.. and R activation rows m0.. in format F. Per block:
// codes widened to int16, two madd_epi16 against the int16 activations (int32 lanes of at
// most 4 * 127 * 32767 < 2^24: the float conversion is exact), one FMA per scale group.
template <int NR, int R, int F>
void dot_tile(const Weights& W, int64_t n0, const Quantised& xq, int64_t m0, float* y,
              int64_t ldy) {
  constexpr int SPB = scales_per_block(F);
  const int64_t K = W.K, G = K / QK, SG = G * SPB;
  float* prod = (float*)__builtin_alloca(sizeof(float) * NR * R * SG);
  float mterm[NR][R];
  tile_prologue<NR, R, F>(W, n0, xq, m0, prod, mterm);
  __m256 acc[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i lo[NR], hi[NR];  // values 0..15 and 16..31 of the block, as int16
    for (int j = 0; j < NR; ++j) load_block16<F>(W, n0 + j, g, lo[j], hi[j]);
    for (int r = 0; r < R; ++r) {
      const int16_t* x = xq.q + (m0 + r) * K + g * QK;
      const __m256i x0 = _mm256_loadu_si256((const __m256i*)x);
      const __m256i x1 = _mm256_loadu_si256((const __m256i*)(x + 16));
      for (int j = 0; j < NR; ++j) {
        const float* p = prod + (j * R + r) * SG;
        if (SPB == 2) {
          acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(lo[j], x0)),
                                      _mm256_broadcast_ss(p + 2 * g), acc[j][r]);
          acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(hi[j], x1)),
                                      _mm256_broadcast_ss(p + 2 * g + 1), acc[j][r]);
        } else {
          const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(lo[j], x0), _mm256_madd_epi16(hi[j], x1));
          acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(p + g), acc[j][r]);
        }
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r)
      y[r * ldy + j] = hsum(acc[j][r]) + mterm[j][r] + (W.bias ? W.bias[n0 + j] : 0.0f);
}

""" + VNNI_SOURCE + GEMM_SOURCE + VNNI_GEMM_SOURCE + r"""
// Activation row m against weight rows [s0, s1) (y: that row's outputs): 4-row tiles from s0,
// then single rows. small_linear's one-row sub-tile, and pqx_moe_rows' (moe_rows_source.py),
// whose bits match the per-expert calls because both run this on the same sub-tiles.
template <int F>
inline void one_row_tiles(const Weights& W, const Quantised& xq, int64_t m, float* y, int64_t s0,
                          int64_t s1) {
  int64_t n = s0;
  for (; n + 4 <= s1; n += 4) row_tile<4, 1, F>(W, n, xq, m, y + n, W.ld());
  for (; n < s1; ++n) row_tile<1, 1, F>(W, n, xq, m, y + n, W.ld());
}

// Few rows: dot_tile over MR-row tiles (weights streamed from memory once per call).
template <int F>
void small_linear(const float* x, int64_t M, const Weights& W, float* y, int threads) {
  const Quantised& xq = quantise(x, M, W.K);
  const int64_t N = W.ld();
  over_rows(W.N, threads, [&](int64_t n0, int64_t n1) {
    for (int64_t s0 = n0; s0 < n1; s0 += NB) {
      const int64_t s1 = s0 + NB < n1 ? s0 + NB : n1;
      int64_t m = 0;
      for (; m + MR <= M; m += MR)
        for (int64_t n = s0; n < s1; ++n) row_tile<1, MR, F>(W, n, xq, m, y + m * N + n, N);
      const int64_t R = M - m;
      if (R == 1) {
        one_row_tiles<F>(W, xq, m, y + m * N, s0, s1);
        continue;
      }
      int64_t n = s0;
      if (R == 2)
        for (; n + 2 <= s1; n += 2) row_tile<2, 2, F>(W, n, xq, m, y + m * N + n, N);
      for (; R > 0 && n < s1; ++n) {
        float* out = y + m * N + n;
        if (R == 3) row_tile<1, 3, F>(W, n, xq, m, out, N);
        else row_tile<1, 2, F>(W, n, xq, m, out, N);
      }
    }
  });
}

template <int F>
void linear(const float* x, int64_t M, const Weights& W, float* y, int threads) {
  // a long K (down_proj, 1536) keeps the row tiles up to 15 rows: 111 vs 153 us at 8 rows
  if (M >= GEMM_FROM && (W.K <= 1024 || M >= 2 * GEMM_FROM)) gemm<F>(x, M, W, y, threads);
  else small_linear<F>(x, M, W, y, threads);
}

// One row block of a projection in its own format ([Part] of a ctypes mirror: linear.py).
struct Part {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;
  const float* bias;
  int64_t rows;
  int64_t fmt;
};

// A projection y[M, N] = x[M, K] @ W.T (+ bias): up to 3 row blocks, each in its own format
// (a fused q/k/v whose v is Q6_K and q, k Q4_K stays one projection).
struct Proj {
  Part part[3];
  int64_t n_parts, K, N;
};

template <int F>
void part_call(int kind, const float* x, int64_t M, const Weights& W, float* y, int threads) {
  if (kind == 0) linear<F>(x, M, W, y, threads);
  else if (kind == 1) small_linear<F>(x, M, W, y, threads);
  else gemm<F>(x, M, W, y, threads);
}

// kind: 0 picks by M (as linear), 1 forces the row tiles, 2 the panel GEMM (tests, benches).
void proj_linear(const float* x, int64_t M, const Proj& p, float* y, int threads, int kind = 0) {
  int64_t row = 0;
  for (int64_t i = 0; i < p.n_parts; ++i) {
    const Part& q = p.part[i];
    const Weights W{q.codes, q.scales, q.mins, q.bias, p.K, q.rows, p.N};
    if (q.fmt == F_Q4) part_call<F_Q4>(kind, x, M, W, y + row, threads);
    else if (q.fmt == F_Q4K) part_call<F_Q4K>(kind, x, M, W, y + row, threads);
    else if (q.fmt == F_Q8) part_call<F_Q8>(kind, x, M, W, y + row, threads);
    else if (q.fmt == F_Q6) part_call<F_Q6>(kind, x, M, W, y + row, threads);
    else part_call<F_Q8G16>(kind, x, M, W, y + row, threads);
    row += q.rows;
  }
}

// ------------------------------------------------------------------------- SwiGLU MLP

// e^x for |x| <= 88 (clamped outside): 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor
// polynomial, relative error ~1e-7.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// a[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i]
void silu_mul(const float* g, const float* u, int64_t n, float* a) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) a[i] = g[i] / (1.0f + __builtin_expf(-g[i])) * u[i];
}

// a[m] = silu_mul of h[m]'s two halves ([gate | up], 2I values) for M rows.
void silu_rows(const float* h, int64_t M, int64_t I, float* a, int threads) {
  if (M < GEMM_FROM) threads = 1;
  over_rows(M, threads, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) silu_mul(h + m * 2 * I, h + m * 2 * I + I, I, a + m * I);
  });
}

thread_local std::vector<float> mlp_scratch;

// ------------------------------------------------------------------------- (de)quantising

inline void store_scaled(const uint8_t* p, __m256 s, __m256 m, float* o, bool u4) {
  // 16 bytes (int8 codes, or q4 codes already unpacked to bytes) -> 16 floats code * s + m
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  const __m128i b8 = _mm_srli_si128(b, 8);
  const __m256 lo = _mm256_cvtepi32_ps(u4 ? _mm256_cvtepu8_epi32(b) : _mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(u4 ? _mm256_cvtepu8_epi32(b8) : _mm256_cvtepi8_epi32(b8));
  _mm256_storeu_ps(o, _mm256_fmadd_ps(lo, s, m));
  _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(hi, s, m));
}

// 16 int16 codes -> 16 floats code * s
inline void store_scaled_i16(__m256i v, __m256 s, float* o) {
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1)));
  _mm256_storeu_ps(o, _mm256_mul_ps(lo, s));
  _mm256_storeu_ps(o + 8, _mm256_mul_ps(hi, s));
}

// Float rows [n0, n1) of a matrix in format F, to out (rows K floats apart).
template <int F>
void dequant_rows(const Weights& W, int64_t n0, int64_t n1, float* out) {
  constexpr bool Q8 = codes_of(F) != F_Q4;
  const int64_t K = W.K, G = K / QK;
  alignas(16) uint8_t half[2][16];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < G; ++g) {
      float fs, fs1, fm;
      block_params<F>(W, n, g, fs, fs1, fm);
      const __m256 s = _mm256_set1_ps(fs), s1 = _mm256_set1_ps(fs1), m = _mm256_set1_ps(fm);
      float* o = out + (n - n0) * K + g * QK;
      if (F == F_Q6) {
        __m256i lo, hi;
        load_block16<F>(W, n, g, lo, hi);
        store_scaled_i16(lo, s, o);
        store_scaled_i16(hi, s1, o + 16);
      } else if (Q8) {
        store_scaled(W.codes + n * K + g * QK, s, m, o, false);
        store_scaled(W.codes + n * K + g * QK + 16, s1, m, o + 16, false);
      } else {
        const __m128i raw = _mm_loadu_si128((const __m128i*)(W.codes + n * (K / 2) + g * 16));
        const __m128i m4 = _mm_set1_epi8(0x0F);
        _mm_store_si128((__m128i*)half[0], _mm_and_si128(raw, m4));
        _mm_store_si128((__m128i*)half[1], _mm_and_si128(_mm_srli_epi16(raw, 4), m4));
        store_scaled(half[0], s, m, o, true);
        store_scaled(half[1], s, m, o + 16, true);
      }
    }
}

""" + SWIGLU_GEMM_SOURCE + MOE_ROWS_SOURCE + r"""
}  // namespace

extern "C" {

int pq_abi_version() { return 19; }

// The row tiles' instruction set: 0 AVX2, 1 AVX-512 VNNI (refused where the CPU lacks it),
// -1 only asks. Returns the one in effect.
int pq_set_isa(int isa) {
  if (isa == 0 || (isa == 1 && vnni_supported())) g_vnni = isa;
  return g_vnni;
}

// y[M, N] = x[M, K] @ W.T (+ bias) for q4 weights. K % 32 == 0; bias may be null.
void pq4_linear(const float* x, int64_t M, int64_t K, const uint8_t* codes, const uint16_t* scales,
                const uint16_t* mins, int64_t N, const float* bias, float* y, int threads) {
  linear<F_Q4>(x, M, Weights{codes, scales, mins, bias, K, N}, y, threads);
}

// y[M, N] = x[M, K] @ W.T (+ bias) for q8 weights. K % 32 == 0; bias may be null.
void pq8_linear(const float* x, int64_t M, int64_t K, const int8_t* codes, const uint16_t* scales,
                int64_t N, const float* bias, float* y, int threads) {
  linear<F_Q8>(x, M, Weights{(const uint8_t*)codes, scales, nullptr, bias, K, N}, y, threads);
}

// y[M, H] = down(silu(gate) * up) with [gate | up] = x[M, H] @ gate_up.T: a Llama MLP in one
// call, both weights q4 (gate_up [2I, H], down [H, I]).
void pq4_mlp(const float* x, int64_t M, int64_t H, int64_t I, const uint8_t* gu_codes,
             const uint16_t* gu_scales, const uint16_t* gu_mins, const float* gu_bias,
             const uint8_t* d_codes, const uint16_t* d_scales, const uint16_t* d_mins,
             const float* d_bias, float* y, int threads) {
  mlp_scratch.resize(M * 3 * I);
  float* h = mlp_scratch.data();
  float* a = h + M * 2 * I;
  linear<F_Q4>(x, M, Weights{gu_codes, gu_scales, gu_mins, gu_bias, H, 2 * I}, h, threads);
  silu_rows(h, M, I, a, threads);
  linear<F_Q4>(a, M, Weights{d_codes, d_scales, d_mins, d_bias, I, H}, y, threads);
}

// y[M, N] = x[M, K] @ W.T for a projection of row blocks in any formats (kind: see proj_linear).
void pqx_linear(const float* x, int64_t M, const Proj* p, float* y, int threads, int kind) {
  proj_linear(x, M, *p, y, threads, kind);
}

// y[M, H] = down(silu(gate) * up), [gate | up] = x @ gate_up.T, each projection in any format.
void pqx_mlp(const float* x, int64_t M, const Proj* gu, const Proj* down, float* y, int threads) {
  const int64_t I = down->K;
  if (swiglu_applies(M, *gu, *down)) {  // prefill: gate/up, SiLU·up and its quantising in one
    swiglu_mlp(x, M, *gu, *down, y, threads);  // pass; no [M, 2I] or [M, I] float scratch
    return;
  }
  mlp_scratch.resize(M * 3 * I);
  float* h = mlp_scratch.data();
  float* a = h + M * 2 * I;
  proj_linear(x, M, *gu, h, threads);
  silu_rows(h, M, I, a, threads);
  proj_linear(a, M, *down, y, threads);
}

// out[N, K] = a projection's float weights.
void pqx_dequant(const Proj* p, float* out, int threads) {
  const int64_t K = p->K;
  int64_t row = 0;
  for (int64_t i = 0; i < p->n_parts; ++i) {
    const Part& q = p->part[i];
    const Weights W{q.codes, q.scales, q.mins, nullptr, K, q.rows};
    float* o = out + row * K;
    over_rows(q.rows, threads, [&](int64_t n0, int64_t n1) {
      if (q.fmt == F_Q4) dequant_rows<F_Q4>(W, n0, n1, o + n0 * K);
      else if (q.fmt == F_Q4K) dequant_rows<F_Q4K>(W, n0, n1, o + n0 * K);
      else if (q.fmt == F_Q8) dequant_rows<F_Q8>(W, n0, n1, o + n0 * K);
      else if (q.fmt == F_Q6) dequant_rows<F_Q6>(W, n0, n1, o + n0 * K);
      else dequant_rows<F_Q8G16>(W, n0, n1, o + n0 * K);
    });
    row += q.rows;
  }
}

// out[T, K] = rows ids[T] of a one-part projection in any format (an embedding lookup kept as
// the file's codes); the position of the first id outside [0, N) (its row left unwritten), or -1.
int64_t pqx_rows(const Proj* p, const int64_t* ids, int64_t T, float* out) {
  const Part& q = p->part[0];
  const Weights W{q.codes, q.scales, q.mins, nullptr, p->K, q.rows};
  int64_t bad = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (ids[t] < 0 || ids[t] >= q.rows) {
      if (bad < 0) bad = t;
      continue;
    }
    if (q.fmt == F_Q4) dequant_rows<F_Q4>(W, ids[t], ids[t] + 1, out + t * p->K);
    else if (q.fmt == F_Q4K) dequant_rows<F_Q4K>(W, ids[t], ids[t] + 1, out + t * p->K);
    else if (q.fmt == F_Q8G16) dequant_rows<F_Q8G16>(W, ids[t], ids[t] + 1, out + t * p->K);
    else if (q.fmt == F_Q6) dequant_rows<F_Q6>(W, ids[t], ids[t] + 1, out + t * p->K);
    else dequant_rows<F_Q8>(W, ids[t], ids[t] + 1, out + t * p->K);
  }
  return bad;
}

// out[N, K] = the float weights (for large-M calls, which are compute-bound: a float GEMM).
void pq4_dequant(const uint8_t* codes, const uint16_t* scales, const uint16_t* mins, int64_t N,
                 int64_t K, float* out, int threads) {
  const Weights W{codes, scales, mins, nullptr, K, N};
  over_rows(N, threads, [&](int64_t n0, int64_t n1) { dequant_rows<F_Q4>(W, n0, n1, out + n0 * K); });
}

void pq8_dequant(const int8_t* codes, const uint16_t* scales, int64_t N, int64_t K, float* out,
                 int threads) {
  const Weights W{(const uint8_t*)codes, scales, nullptr, nullptr, K, N};
  over_rows(N, threads, [&](int64_t n0, int64_t n1) { dequant_rows<F_Q8>(W, n0, n1, out + n0 * K); });
}

// out[T, K] = rows ids[T] of a q8 matrix of N rows (an embedding lookup). Returns the position
// of the first id outside [0, N) (its row is left unwritten), or -1.
int64_t pq8_rows(const int8_t* codes, const uint16_t* scales, int64_t N, const int64_t* ids,
                 int64_t T, int64_t K, float* out) {
  const Weights W{(const uint8_t*)codes, scales, nullptr, nullptr, K, N};
  int64_t bad = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (ids[t] < 0 || ids[t] >= N) {
      if (bad < 0) bad = t;
      continue;
    }
    dequant_rows<F_Q8>(W, ids[t], ids[t] + 1, out + t * K);
  }
  return bad;
}

// Packing at load. q4: codes [N, K] (0..15, one per byte) -> nibbles [N, K/2] in GGUF order;
// float scales and mins [N, K/32] -> float16 (round to nearest even, as torch's .half()).
void pq4_pack(const uint8_t* codes, const float* scales, const float* mins, int64_t N, int64_t K,
              uint8_t* out, uint16_t* out_scales, uint16_t* out_mins) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < N * K / QK; ++i) {
    const __m128i lo = _mm_and_si128(_mm_loadu_si128((const __m128i*)(codes + i * QK)), m4);
    const __m128i hi = _mm_and_si128(_mm_loadu_si128((const __m128i*)(codes + i * QK + 16)), m4);
    _mm_storeu_si128((__m128i*)(out + i * 16), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
    out_scales[i] = _cvtss_sh(scales[i], _MM_FROUND_TO_NEAREST_INT);
    out_mins[i] = _cvtss_sh(mins[i], _MM_FROUND_TO_NEAREST_INT);
  }
}

// q6: int8 codes [N, K] in -32..31 -> F_Q6 blocks [N, K/32 * 24] (layout at q6_unpack).
void pq6_pack(const int8_t* codes, int64_t N, int64_t K, uint8_t* out) {
  for (int64_t i = 0; i < N * K / QK; ++i) {
    const int8_t* c = codes + i * QK;
    uint8_t* o = out + i * 24;
    uint8_t u[32];
    for (int j = 0; j < 32; ++j) u[j] = (uint8_t)(c[j] + 32) & 63;
    for (int j = 0; j < 16; ++j) o[j] = (u[j] & 15) | (u[j + 16] & 15) << 4;
    for (int j = 0; j < 8; ++j)
      o[16 + j] = (u[j] >> 4) | (u[j + 8] >> 4) << 2 | (u[j + 16] >> 4) << 4 | (u[j + 24] >> 4) << 6;
  }
}

// q8: float w [N, K] -> codes [N, K] and float16 scales [N, K/32]: per block
// scale = fp16(max|w| / 127), code = round(w / scale) (exact for weights that were Q8_0).
void pq8_pack(const float* w, int64_t N, int64_t K, int8_t* codes, uint16_t* scales) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < N * K / QK; ++i) {
    const float* b = w + i * QK;
    __m256 v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(b + 8 * j);
    const float amax = hmax(_mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
    const uint16_t h = _cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT);
    const float d = _cvtsh_ss(h);
    scales[i] = h;
    const __m256 dd = _mm256_set1_ps(d > 0.0f ? d : 1.0f);
    __m256i q[4];  // w / d (exact division, as the reference), rounded half to even
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_div_ps(d > 0.0f ? v[j] : _mm256_setzero_ps(), dd));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_max_epi8(_mm256_permutevar8x32_epi32(p, order), _mm256_set1_epi8(-127));
    _mm256_storeu_si256((__m256i*)(codes + i * QK), p);
  }
}

}  // extern "C"
""" + LAYER_SOURCE + PREFILL_ATTENTION_SOURCE + GEMM_ENTRY_POINTS + MOE_ROWS_ENTRY
KERNEL_SOURCE += MOE_LAYER_ENTRY
KERNEL_SOURCE += BF16_SOURCE
