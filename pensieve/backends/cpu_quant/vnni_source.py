"""The C++ of the AVX-512 VNNI row-tile kernel (spliced into ``source.KERNEL_SOURCE`` after
``dot_tile``), chosen at run time; the AVX2 ``dot_tile`` stays the fallback.

Same numerics as ``dot_tile``: the int16 activation blocks of ``quantize_row`` and the same
weight codes, multiplied by ``vpdpwssd`` (int16 pairs multiplied and added into int32 lanes:
``madd_epi16`` and ``add_epi32`` in one instruction) on 512-bit registers. The int32 block
sums are the exact integers the AVX2 kernel forms (|lane| ≤ 4·15·32767 for q4, 2·127·32767
for int8 codes: < 2²⁴, so their float conversion is exact too), then scaled per block as
there; only the float accumulation order differs, so results agree with the AVX2 kernel's to
float rounding (~1e-7) and with float matmuls to ~2e-5 as before. int16 rather than
``vpdpbusd``'s u8×s8 products with int8 activations: the int8 path would halve the
multiply-adds again but costs ~5e-3 relative error (93% top-1 agreement with float on
SmolLM2-135M, measured when the AVX2 kernels were written), which the decode-agreement
tests (≥ 99%) refuse.

Layouts per 512-bit step:

* q4 (nibbles, value ``j`` low and ``j + 16`` high in byte ``j`` of a block): two blocks'
  32 bytes widened to 32 int16; ``& 0xF`` gives values 0–15 of blocks g and g+1, ``>> 4``
  values 16–31; the activations are gathered to match (two 256-bit halves). int32 lanes 0–7
  hold block g, 8–15 block g+1, scaled by ``[p_g ×8, p_{g+1} ×8]``. An odd last block runs
  on 256-bit registers.
* int8 codes, one scale per 32: a block's 32 codes widened to 32 int16, natural order.
* int8 codes, scales per 16: as above; lanes 0–7 are the first half block, 8–15 the
  second, scaled by ``[p_2g ×8, p_2g+1 ×8]``.
* 6-bit codes (``F_Q6``, Q6_K): unpacked straight to 32 int16 on one 512-bit register
  (``q6_unpack512``: variable shifts and one ternary-logic op), then as int8 codes per 16.

Every function here carries ``VNNI_TARGET``; the rest of the library is compiled for AVX2,
so a CPU without AVX-512 never executes an AVX-512 instruction as long as ``g_vnni`` stays 0
(``pq_set_isa`` refuses 1 where ``__builtin_cpu_supports`` says no).
"""

VNNI_SOURCE = r"""
// ------------------------------------------------------------------------- AVX-512 VNNI

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

int g_vnni = 0;  // 1: the row tiles run dot_tile_vnni (set by pq_set_isa)

bool vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// [p[0] x8, p[1] x8]
VNNI_TARGET inline __m512 expand2(const float* p) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(p[0])),
                                             _mm256_castps_pd(_mm256_set1_ps(p[1])), 1));
}

// 16 int16 at a and 16 at b as one 512-bit register [a | b]
VNNI_TARGET inline __m512i join16(const int16_t* a, const int16_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                            _mm256_loadu_si256((const __m256i*)b), 1);
}

// A F_Q6 block (layout at q6_unpack) as its 32 codes -32..31 in int16, on one 512-bit
// register: the 16 nibble bytes widened twice ([b | b]) and the 8 high-bit bytes four times,
// each lane's nibble shifted to bits 10-13 and its two high bits to 14-15, one ternary-logic
// select, then an arithmetic shift right by 10. 7 vector ops against ~18 for the 256-bit
// unpack and join; the same codes.
VNNI_TARGET inline __m512i q6_unpack512(const uint8_t* p) {
  int64_t h8;
  __builtin_memcpy(&h8, p + 16, 8);
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p)));
  const __m512i h = _mm512_cvtepu8_epi16(_mm256_set1_epi64x(h8));
  // the nibble to bits 10-13: values 0-15 (low nibbles) by 10, values 16-31 (high) by 6
  const __m512i lo = _mm512_sllv_epi16(b, _mm512_set_epi64(
      0x0006000600060006, 0x0006000600060006, 0x0006000600060006, 0x0006000600060006,
      0x000A000A000A000A, 0x000A000A000A000A, 0x000A000A000A000A, 0x000A000A000A000A));
  // the value's two high bits (bits 0-1, 2-3, 4-5, 6-7 of its byte by eights) to bits 14-15
  const __m512i hi = _mm512_sllv_epi16(h, _mm512_set_epi64(
      0x0008000800080008, 0x0008000800080008, 0x000A000A000A000A, 0x000A000A000A000A,
      0x000C000C000C000C, 0x000C000C000C000C, 0x000E000E000E000E, 0x000E000E000E000E));
  // bits 10-13 from lo, 14-15 from hi (below 10: discarded by the shift), the top bit flipped:
  // u - 32 = (u ^ 32) read as a signed 6-bit number
  const __m512i u = _mm512_ternarylogic_epi32(_mm512_set1_epi16(0x3C00), lo, hi, 0xCA);
  return _mm512_srai_epi16(_mm512_xor_si512(u, _mm512_set1_epi16((short)0x8000)), 10);
}

// prepare_q4k on AVX-512 (the same products in the same order): a super-block's 12 scale
// bytes unpacked by two byte shuffles, two shifts and two ternary-logic ops into [sc x8 | m x8]
// (layout at k4_unpack), widened to 16 floats and scaled by [d x8 | dmin x8] and
// [activation scales | block sums] at once. ~20 vector ops a super-block against ~35 with
// the scalar unpack: decode's row tiles are compute-bound per thread, so this is their cost.
VNNI_TARGET inline float prepare_q4k_512(const uint8_t* q, const uint16_t* dm, const float* xd,
                                         const float* xs, int64_t G, float* prod) {
  const __m128i iL = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11);
  const __m128i iH = _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7);
  const __m128i sel = _mm_setr_epi32(-1, -1, -1, 0);  // bytes 12-15 (mins 4-7) from L >> 4
  const __m128i keep = _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
  const __m128i top = _mm_set1_epi8(0x30);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 macc = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g += 8, q += Q4K_SB, dm += 2) {
    const __m128i b = _mm_maskz_loadu_epi8(0x0FFF, q);
    const __m128i L = _mm_shuffle_epi8(b, iL), H = _mm_shuffle_epi8(b, iH);
    __m128i v = _mm_and_si128(_mm_ternarylogic_epi32(sel, L, _mm_srli_epi16(L, 4), 0xCA), keep);
    v = _mm_ternarylogic_epi32(v, _mm_srli_epi16(H, 2), top, 0xF8);  // v | (H >> 2 & 0x30)
    const __m512 sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    uint32_t d2;
    __builtin_memcpy(&d2, dm, 4);
    const __m512 f = _mm512_permutexvar_ps(
        spread, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)d2))));
    const __m512 x = _mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(xd + g))),
        _mm256_castps_pd(_mm256_loadu_ps(xs + g)), 1));
    const __m512 t = _mm512_mul_ps(_mm512_mul_ps(sm, f), x);
    _mm256_storeu_ps(prod + g, _mm512_castps512_ps256(t));
    macc = _mm512_add_ps(macc, t);
  }
  return -hsum(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(macc), 1)));
}

// prepare_q6 on AVX-512 (the same products in the same order): a super-block's 16 sub-scales
// in one register.
VNNI_TARGET inline void prepare_q6_512(const uint8_t* sb, const float* xd, int64_t G, float* prod) {
  const __m512i dup = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  for (int64_t g = 0; g < G; g += 8, sb += Q6_SB) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(sb + 2))));
    const __m512 x = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(xd + g)));
    _mm512_storeu_ps(prod + 2 * g, _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(half_at(sb))), x));
  }
}

// prepare_row with the AVX-512 super-block unpacks.
template <int F>
VNNI_TARGET inline float prepare_row_vnni(const Weights& W, int64_t n, const float* xd,
                                          const float* xs, float* prod) {
  const int64_t G = W.K / QK;
  if (F == F_Q6) {
    prepare_q6_512((const uint8_t*)(W.scales + n * scale_row(F, W.K)), xd, G, prod);
    return 0.0f;
  }
  if (F == F_Q4K)
    return prepare_q4k_512((const uint8_t*)(W.scales + n * scale_row(F, W.K)),
                           W.mins + n * min_row(F, W.K), xd, xs, G, prod);
  return prepare_row<F>(W, n, xd, xs, prod);
}

// The block factors of tile_prologue without its prefetch burst; the next tiles' scales and
// mins prefetched (a few lines), their codes streamed by the tile's loop (vnni_ahead).
template <int NR, int R, int F>
VNNI_TARGET inline void tile_factors(const Weights& W, int64_t n0, const Quantised& xq, int64_t m0,
                         float* prod, float (&mterm)[NR][R]) {
  constexpr int SPB = scales_per_block(F);
  const int64_t G = W.K / QK, SG = G * SPB, SR = scale_row(F, W.K), MR_ = min_row(F, W.K);
  if (n0 + PF_ROWS + NR <= W.N) {
    prefetch_span(W.scales + (n0 + PF_ROWS) * SR, NR * SR * 2);
    if (W.mins) prefetch_span(W.mins + (n0 + PF_ROWS) * MR_, NR * MR_ * 2);
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r)
      mterm[j][r] = prepare_row_vnni<F>(W, n0 + j, xq.d + (m0 + r) * G, xq.s + (m0 + r) * G,
                                        prod + (j * R + r) * SG);
}

// Codes prefetch distance of the VNNI tile, in tiles: each step of its loop prefetches the
// same bytes of the rows VNNI_AHEAD tiles on (one line a row per 64 bytes of codes), so the
// reads ahead are spread over the tile instead of issued at its start (a burst of NR rows'
// lines, 420 of them for a Q6_K down_proj tile: more than the L1 holds).
#ifndef VNNI_AHEAD
#define VNNI_AHEAD 2
#endif

// dot_tile on AVX-512 VNNI: the same tiles, block factors and result.
template <int NR, int R, int F>
VNNI_TARGET void dot_tile_vnni(const Weights& W, int64_t n0, const Quantised& xq, int64_t m0,
                               float* y, int64_t ldy) {
  constexpr bool Q8 = codes_of(F) != F_Q4;
  constexpr int SPB = scales_per_block(F);
  const int64_t K = W.K, G = K / QK, row_bytes = G * block_bytes(F), SG = G * SPB;
  float* prod = (float*)__builtin_alloca(sizeof(float) * NR * R * SG);
  float mterm[NR][R];
#if VNNI_AHEAD
  tile_factors<NR, R, F>(W, n0, xq, m0, prod, mterm);
  const int64_t ahead = n0 + VNNI_AHEAD * NR + NR <= W.N ? VNNI_AHEAD * NR * row_bytes : 0;
#else
  tile_prologue<NR, R, F>(W, n0, xq, m0, prod, mterm);
  const int64_t ahead = 0;
#endif
  __m512 acc[NR][R];
  __m256 tail[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps(), tail[j][r] = _mm256_setzero_ps();
  if (!Q8) {
    const __m512i m4 = _mm512_set1_epi16(0x0F);
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
      __m512i lo[NR], hi[NR];
      for (int j = 0; j < NR; ++j) {
        const uint8_t* w = W.codes + (n0 + j) * row_bytes + g * 16;
        if (ahead && (g & 3) == 0) _mm_prefetch((const char*)w + ahead, _MM_HINT_T0);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)w));
        lo[j] = _mm512_and_si512(b, m4);
        hi[j] = _mm512_srli_epi16(b, 4);
      }
      for (int r = 0; r < R; ++r) {
        const int16_t* x = xq.q + (m0 + r) * K + g * QK;
        const __m512i xlo = join16(x, x + QK), xhi = join16(x + 16, x + QK + 16);
        for (int j = 0; j < NR; ++j) {
          __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo[j], xlo);
          s = _mm512_dpwssd_epi32(s, hi[j], xhi);
          acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), expand2(prod + (j * R + r) * SG + g),
                                      acc[j][r]);
        }
      }
    }
    if (g < G) {  // an odd last block, on 256-bit registers
      const __m256i m4h = _mm256_set1_epi16(0x0F);
      for (int j = 0; j < NR; ++j) {
        const uint8_t* w = W.codes + (n0 + j) * row_bytes + g * 16;
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)w));
        for (int r = 0; r < R; ++r) {
          const int16_t* x = xq.q + (m0 + r) * K + g * QK;
          __m256i s = _mm256_dpwssd_epi32(_mm256_setzero_si256(), _mm256_and_si256(b, m4h),
                                          _mm256_loadu_si256((const __m256i*)x));
          s = _mm256_dpwssd_epi32(s, _mm256_srli_epi16(b, 4), _mm256_loadu_si256((const __m256i*)(x + 16)));
          tail[j][r] = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(prod[(j * R + r) * SG + g]));
        }
      }
    }
  } else {
    for (int64_t g = 0; g < G; ++g) {
      __m512i wv[NR];
      for (int j = 0; j < NR; ++j) {
        // one prefetch a 64-byte line: every 8 / 3 / 2 blocks of 24 / 32 bytes (Q6 lines
        // straddle blocks: every third block, one line ahead covers the next)
        if (ahead && g % (F == F_Q6 ? 8 : 2) == 0) {
          const char* w = (const char*)(W.codes + ((n0 + j) * G + g) * block_bytes(F)) + ahead;
          _mm_prefetch(w, _MM_HINT_T0);
          if (F == F_Q6) {
            _mm_prefetch(w + 64, _MM_HINT_T0);
            _mm_prefetch(w + 128, _MM_HINT_T0);
          }
        }
        if (F == F_Q6) {
          wv[j] = q6_unpack512(W.codes + ((n0 + j) * G + g) * block_bytes(F));
        } else {
          wv[j] = _mm512_cvtepi8_epi16(
              _mm256_loadu_si256((const __m256i*)(W.codes + (n0 + j) * row_bytes + g * QK)));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_loadu_si512((const void*)(xq.q + (m0 + r) * K + g * QK));
        for (int j = 0; j < NR; ++j) {
          const float* p = prod + (j * R + r) * SG;
          const __m512 sc = SPB == 2 ? expand2(p + 2 * g) : _mm512_set1_ps(p[g]);
          const __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv[j], x);
          acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[j][r]);
        }
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r)
      y[r * ldy + j] = _mm512_reduce_add_ps(acc[j][r]) + hsum(tail[j][r]) + mterm[j][r] +
                       (W.bias ? W.bias[n0 + j] : 0.0f);
}

// The row tile on the selected instruction set.
template <int NR, int R, int F>
inline void row_tile(const Weights& W, int64_t n0, const Quantised& xq, int64_t m0, float* y,
                     int64_t ldy) {
  if (g_vnni) dot_tile_vnni<NR, R, F>(W, n0, xq, m0, y, ldy);
  else dot_tile<NR, R, F>(W, n0, xq, m0, y, ldy);
}

"""
