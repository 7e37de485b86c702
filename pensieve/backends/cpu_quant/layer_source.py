"""The C++ of a decoder layer's glue on the CPU: RMSNorm, RoPE + paged KV store, decode attention.

At one token a layer's float work is tiny (576 values through a norm, 9 heads over a few
hundred cached keys) and PyTorch spends its time in dispatch instead: RMSNorm decomposes into
~8 ops (~50 µs a call), and the paged attention loop gathers blocks, transposes, concatenates
for RoPE and calls SDPA (~7 ms a token over 30 layers). These functions do the same in one
call each (appended to ``source.KERNEL_SOURCE``; float32, AVX2 + FMA):

* ``pq_rmsnorm``: ``y = x / sqrt(mean(x²) + eps) · w`` per row.
* ``pq_rope_store``: rotate-half RoPE of q (in place) and k, and k/v written to their cache
  slots; q/k/v may be strided row views of the fused qkv output.

The KV cache may hold float32 or float16 (half the memory and the bytes read per decoded
token at long contexts; converted with F16C, rounding to nearest even as ``tensor.half()``).
* ``pq_paged_decode``: one query token per sequence attending over its whole cached context
  (GQA: each KV head's keys read once for its group of query heads), softmax in float32 with
  the running maximum subtracted; threads over (sequence, KV head).
* ``pq_release_scratch``: the calling thread's per-call buffers handed back (after a prefill).
* ``pq_decode_profile``: seconds per part of ``pq_decode_layers`` (norms, each projection,
  RoPE + store, attention, SiLU, adds) while switched on (``bench/cpu_decode_profile.py``).
* ``pq_decode_layers``: a decode step's every Llama layer in one call (each projection a
  ``Proj``: row blocks in any of the code formats, so Q4_K and Q6_K layers mix), out of the
  pieces above and ``linear``/``silu_mul``: no Python between layers. A layer may add per-head
  q/k RMSNorms (Qwen3) and take a softmax-routed MoE MLP instead of the dense one
  (``moe_layer_source.py``).
"""

from pensieve.backends.cpu_quant.moe_layer_source import MOE_LAYER_SOURCE

LAYER_SOURCE = r"""
#include <malloc.h>
#include <algorithm>

namespace {

inline void rope_row(float* x, const float* cos, const float* sin, int64_t D) {
  // rotate-half: x' = x * cos + (-x[D/2:], x[:D/2]) * sin
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + h + i);
    const __m256 ra = _mm256_fnmadd_ps(b, _mm256_loadu_ps(sin + i), _mm256_mul_ps(a, _mm256_loadu_ps(cos + i)));
    const __m256 rb = _mm256_fmadd_ps(a, _mm256_loadu_ps(sin + h + i), _mm256_mul_ps(b, _mm256_loadu_ps(cos + h + i)));
    _mm256_storeu_ps(x + i, ra);
    _mm256_storeu_ps(x + h + i, rb);
  }
}

// The KV cache holds float32 (T = float) or float16 bits (T = uint16_t).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), load8(b + d), acc);
  return hsum(acc);
}

// p[0, n) ← exp(p − max p); returns their sum (a softmax's denominator). Attention's scores and
// the MoE router's probabilities.
inline float exp_shifted(float* p, int64_t n) {
  float m = p[0];
  for (int64_t j = 1; j < n; ++j) m = p[j] > m ? p[j] : m;
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = __builtin_expf(p[j] - m);
    sum += p[j];
  }
  return sum;
}

thread_local std::vector<float> attn_scores;

struct DecodeArgs {
  const float* q; int64_t q_stride;
  const int64_t* tokens; const int64_t* lens; const int64_t* table_offsets; const int64_t* tables;
  int64_t Hq, Hk, D;
  const void* k_cache; const void* v_cache; int64_t block_size;
  float scale; float* out; int64_t out_stride;
};

// One (sequence, KV head): its G = Hq / Hk query heads over the sequence's L cached tokens.
template <typename T>
void decode_item(const DecodeArgs& a, int64_t s, int64_t h) {
  const int64_t G = a.Hq / a.Hk, D = a.D, L = a.lens[s], bs = a.block_size;
  const int64_t* table = a.tables + a.table_offsets[s];
  const float* q = a.q + a.tokens[s] * a.q_stride + h * G * D;
  float* out = a.out + a.tokens[s] * a.out_stride + h * G * D;
  attn_scores.resize(G * L);
  float* sc = attn_scores.data();
  const int64_t row = a.Hk * D;  // floats per cache slot
  for (int64_t j = 0; j < L; ++j) {
    const T* k = (const T*)a.k_cache + (table[j / bs] * bs + j % bs) * row + h * D;
    for (int64_t g = 0; g < G; ++g) sc[g * L + j] = dot(q + g * D, k, D) * a.scale;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* p = sc + g * L;
    const float inv = 1.0f / exp_shifted(p, L);
    for (int64_t j = 0; j < L; ++j) p[j] *= inv;
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = 0.0f;
  for (int64_t j = 0; j < L; ++j) {
    const T* v = (const T*)a.v_cache + (table[j / bs] * bs + j % bs) * row + h * D;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 p = _mm256_set1_ps(sc[g * L + j]);
      float* o = out + g * D;
      for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, load8(v + d), _mm256_loadu_ps(o + d)));
    }
  }
}

template <typename T>
void rope_store(float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                int64_t v_stride, int64_t T_, int64_t Hq, int64_t Hk, int64_t D,
                const float* cos, const float* sin, const int64_t* slots, T* k_cache,
                T* v_cache) {
  float kr[1024];  // one rotated key head (D <= 1024)
  for (int64_t t = 0; t < T_; ++t) {
    const float* c = cos + t * D;
    const float* s = sin + t * D;
    for (int64_t h = 0; h < Hq; ++h) rope_row(q + t * q_stride + h * D, c, s, D);
    T* kc = k_cache + slots[t] * Hk * D;
    T* vc = v_cache + slots[t] * Hk * D;
    for (int64_t h = 0; h < Hk; ++h) {
      for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(kr + i, _mm256_loadu_ps(k + t * k_stride + h * D + i));
      rope_row(kr, c, s, D);
      for (int64_t i = 0; i < D; i += 8) {
        store8(kc + h * D + i, _mm256_loadu_ps(kr + i));
        store8(vc + h * D + i, _mm256_loadu_ps(v + t * v_stride + h * D + i));
      }
    }
  }
}

""" + MOE_LAYER_SOURCE + r"""
}  // namespace

extern "C" {

// y[M, H] = x / sqrt(mean(x^2) + eps) * w, row by row (x rows x_stride apart).
void pq_rmsnorm(const float* x, int64_t x_stride, int64_t M, int64_t H, const float* w, float eps,
                float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x + m * x_stride;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= H; i += 8) {
      const __m256 v = _mm256_loadu_ps(r + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum(acc);
    for (; i < H; ++i) ss += r[i] * r[i];
    const float inv = 1.0f / __builtin_sqrtf(ss / (float)H + eps);
    const __m256 vi = _mm256_set1_ps(inv);
    float* o = y + m * H;
    for (i = 0; i + 8 <= H; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + i), vi), _mm256_loadu_ps(w + i)));
    for (; i < H; ++i) o[i] = r[i] * inv * w[i];
  }
}

// For each of T tokens: RoPE on its Hq query heads (in place) and Hk key heads, then keys
// and values stored at cache slot slots[t] (caches [slots, Hk, D], float16 if kv_half).
// D % 16 == 0, D <= 1024.
void pq_rope_store(float* q, int64_t q_stride, const float* k, int64_t k_stride, const float* v,
                   int64_t v_stride, int64_t T, int64_t Hq, int64_t Hk, int64_t D,
                   const float* cos, const float* sin, const int64_t* slots, void* k_cache,
                   void* v_cache, int kv_half) {
  if (kv_half)
    rope_store(q, q_stride, k, k_stride, v, v_stride, T, Hq, Hk, D, cos, sin, slots,
               (uint16_t*)k_cache, (uint16_t*)v_cache);
  else
    rope_store(q, q_stride, k, k_stride, v, v_stride, T, Hq, Hk, D, cos, sin, slots,
               (float*)k_cache, (float*)v_cache);
}

// out[tokens[s]] = attention of query row tokens[s] over sequence s's lens[s] cached tokens,
// whose blocks are tables[table_offsets[s]:]; for S sequences of one new token each.
void pq_paged_decode(const float* q, int64_t q_stride, int64_t S, const int64_t* tokens,
                     const int64_t* lens, const int64_t* table_offsets, const int64_t* tables,
                     int64_t Hq, int64_t Hk, int64_t D, const void* k_cache,
                     const void* v_cache, int64_t block_size, float scale, float* out,
                     int64_t out_stride, int threads, int kv_half) {
  const DecodeArgs a{q, q_stride, tokens, lens, table_offsets, tables, Hq, Hk, D,
                     k_cache, v_cache, block_size, scale, out, out_stride};
  const int64_t items = S * Hk;
  auto body = [&](int64_t i) {
    if (kv_half) decode_item<uint16_t>(a, i / Hk, i % Hk);
    else decode_item<float>(a, i / Hk, i % Hk);
  };
  using Body = decltype(body);
  pool().run(items, [](void* c, int64_t i) { (*(Body*)c)(i); }, &body, threads);
}


// One decoder layer's weights and caches (a ctypes.Structure mirrors it: cpu_quant/decoder.py).
struct LayerWeights {
  const float* in_norm;
  const float* post_norm;
  Proj proj[4];  // qkv, o, gate_up, down: each of row blocks in their own code formats
  void* k_cache;
  void* v_cache;
  const float* q_norm;   // per-head RMSNorm of q and k before RoPE (Qwen3), or null: none
  const float* k_norm;
  const MoeWeights* moe;  // the MLP is this router + experts (gate_up, down unused), or null
};

// Seconds spent in each part of pq_decode_layers since the last read, while profiling is on
// (pq_decode_profile): where a decoded token's time goes, without a profiler.
enum { P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_GATE_UP, P_SILU, P_DOWN, P_ADD, P_PARTS };
double g_decode_prof[P_PARTS];
bool g_decode_prof_on = false;

// x[M, H] (the residual stream of M decoding sequences, one token each; row m is sequence m)
// through n_layers Llama layers: x += attn(norm(x)); x += mlp(norm(x)).
void pq_decode_layers(float* x, int64_t M, int64_t H, int64_t I, int64_t n_layers,
                      const LayerWeights* layers, float eps, int64_t Hq, int64_t Hk, int64_t D,
                      const float* cos, const float* sin, const int64_t* slots,
                      const int64_t* lens, const int64_t* table_offsets, const int64_t* tables,
                      int64_t block_size, int threads, int kv_half) {
  const int64_t QKV = (Hq + 2 * Hk) * D, QD = Hq * D;
  static thread_local std::vector<float> scratch;
  static thread_local std::vector<int64_t> rows;
  int64_t k_max = 0;  // the most picks of an MoE layer: its picks' outputs, [k, H]
  for (int64_t l = 0; l < n_layers; ++l)
    if (layers[l].moe && layers[l].moe->k > k_max) k_max = layers[l].moe->k;
  scratch.resize(M * (H + QKV + QD + H + 3 * I) + k_max * H);
  rows.resize(M);
  for (int64_t m = 0; m < M; ++m) rows[m] = m;
  float* h = scratch.data();
  float* qkv = h + M * H;
  float* att = qkv + M * QKV;
  float* o = att + M * QD;
  float* gu = o + M * H;
  float* a = gu + M * 2 * I;
  float* picks = a + M * I;
  const float scale = 1.0f / __builtin_sqrtf((float)D);
  const bool prof = g_decode_prof_on;
  auto last = std::chrono::steady_clock::now();
  auto mark = [&](int part) {
    if (!prof) return;
    const auto now = std::chrono::steady_clock::now();
    g_decode_prof[part] += std::chrono::duration<double>(now - last).count();
    last = now;
  };
  for (int64_t l = 0; l < n_layers; ++l) {
    const LayerWeights& w = layers[l];
    pq_rmsnorm(x, H, M, H, w.in_norm, eps, h);
    mark(P_NORM);
    proj_linear(h, M, w.proj[0], qkv, threads);
    mark(P_QKV);
    if (w.q_norm) {  // in place, each head's D values a row (as the module's RMSNorm)
      for (int64_t m = 0; m < M; ++m) {
        pq_rmsnorm(qkv + m * QKV, D, Hq, D, w.q_norm, eps, qkv + m * QKV);
        pq_rmsnorm(qkv + m * QKV + QD, D, Hk, D, w.k_norm, eps, qkv + m * QKV + QD);
      }
    }
    pq_rope_store(qkv, QKV, qkv + QD, QKV, qkv + QD + Hk * D, QKV, M, Hq, Hk, D, cos, sin, slots,
                  w.k_cache, w.v_cache, kv_half);
    mark(P_ROPE);
    pq_paged_decode(qkv, QKV, M, rows.data(), lens, table_offsets, tables, Hq, Hk, D, w.k_cache,
                    w.v_cache, block_size, scale, att, QD, threads, kv_half);
    mark(P_ATTN);
    proj_linear(att, M, w.proj[1], o, threads);
    mark(P_O);
    for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
    mark(P_ADD);
    pq_rmsnorm(x, H, M, H, w.post_norm, eps, h);
    mark(P_NORM);
    if (w.moe) {  // router, picks and their weighted sum (profiled as gate_up), then the add
      moe_mlp(h, M, H, *w.moe, o, picks, threads);
      mark(P_GATE_UP);
      for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
      mark(P_ADD);
      continue;
    }
    proj_linear(h, M, w.proj[2], gu, threads);
    mark(P_GATE_UP);
    silu_rows(gu, M, I, a, threads);
    mark(P_SILU);
    proj_linear(a, M, w.proj[3], o, threads);
    mark(P_DOWN);
    for (int64_t i = 0; i < M * H; ++i) x[i] += o[i];
    mark(P_ADD);
  }
}

// Profiling of pq_decode_layers: on (1) / off (0) / unchanged (-1); out (P_PARTS doubles: norms,
// qkv, RoPE + KV store, attention, o, gate/up, SiLU, down, residual adds; seconds) gets the
// totals since the last call, which are then reset. Returns the number of parts.
int pq_decode_profile(int on, double* out) {
  if (on >= 0) g_decode_prof_on = on != 0;
  for (int i = 0; i < P_PARTS; ++i) {
    if (out) out[i] = g_decode_prof[i];
    g_decode_prof[i] = 0.0;
  }
  return P_PARTS;
}

// Hand back the calling thread's per-call buffers (the fused MLP's gate/up scratch, the
// quantised activations, attention scores): sized by the largest call so far, a prefill
// chunk's ~64 MB would otherwise stay resident for good. The next call allocates again.
void pq_release_scratch() {
  std::vector<float>().swap(mlp_scratch);
  std::vector<float>().swap(attn_scores);
  free(qbuf.q); free(qbuf.d); free(qbuf.s);
  qbuf = Quantised();
  free(q8buf.q); free(q8buf.d); free(q8buf.s);
  q8buf = Quantised8();
#ifdef __GLIBC__
  malloc_trim(0);  // a buffer malloc placed inside its heap (a free chunk fit) leaves RSS only so
#endif
}

}  // extern "C"
"""