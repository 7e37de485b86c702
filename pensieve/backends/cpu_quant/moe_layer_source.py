"""The C++ of an MoE layer's MLP half inside the one-call decoder (``pq_decode_layers``).

A Qwen3-MoE decode step run as modules is ~100 kernel calls and ~4 ms of torch ops and Python
between them (router matmul, softmax, topk, the picks' weighted sum, views): ~15% of its ~33 ms
step on 2 cores. Here the router and the experts run inside the decoder's one call:

* ``moe_route``: one row's router logits (float32 dots), softmax (max subtracted, float32), the
  top k *as torch.topk picks them on the CPU* — (probability, index) pairs ordered by
  probability, NaN first, with ``std::partial_sort`` where k·64 ≤ E, else ``std::nth_element``
  at k-1 then ``std::sort`` of the first k-1 — so tied probabilities pick the same experts in
  the same order; then renormalised over the k (``norm_topk_prob``) and scaled.
* ``moe_mlp``: per row, its picks through ``moe_rows`` (one pool pass for all gate_ups, one for
  all downs) and summed weight by weight in pick order, as ``SlicedExperts`` sums them.

The logits' dot products round differently from PyTorch's matmul (last bits), so the
weights, and at an exact near-tie the picks, may differ from the module path; the experts'
outputs for the same picks are bitwise ``pqx_moe_rows``'s.
"""

MOE_LAYER_SOURCE = r"""
// A softmax top-k router over SiLU experts (a ctypes.Structure mirrors it: moe_decoder.py).
struct MoeWeights {
  const float* router;      // [E, H] float32
  const Proj* const* gu;    // E gate_up projections ([gate | up] rows)
  const Proj* const* down;  // E down projections
  int64_t E, k, norm_topk;
  float scale;
};

using Pick = std::pair<float, int64_t>;
thread_local std::vector<Pick> route_queue;
thread_local std::vector<float> route_probs;

// torch.topk's order (largest first, NaN above all): what its CPU kernel's sorts give on ties.
inline bool pick_before(const Pick& a, const Pick& b) {
  return (__builtin_isnan(a.first) && !__builtin_isnan(b.first)) || a.first > b.first;
}

// w[k], ids[k] = the routing of one row x[H] (see the module docstring).
void moe_route(const float* x, int64_t H, const MoeWeights& mw, float* w, int64_t* ids) {
  const int64_t E = mw.E, k = mw.k;
  route_probs.resize(E);
  float* p = route_probs.data();
  for (int64_t e = 0; e < E; ++e) {
    const float* r = mw.router + e * H;
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= H; i += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(r + i), acc);
    float s = hsum(acc);
    for (; i < H; ++i) s += x[i] * r[i];
    p[e] = s;
  }
  const float inv = 1.0f / exp_shifted(p, E);
  std::vector<Pick>& q = route_queue;
  q.resize(E);
  for (int64_t e = 0; e < E; ++e) q[e] = Pick(p[e] * inv, e);
  if (k * 64 <= E) {
    std::partial_sort(q.begin(), q.begin() + k, q.end(), pick_before);
  } else {
    std::nth_element(q.begin(), q.begin() + k - 1, q.end(), pick_before);
    std::sort(q.begin(), q.begin() + k - 1, pick_before);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < k; ++j) total += q[j].first;
  for (int64_t j = 0; j < k; ++j) {
    const float v = mw.norm_topk ? q[j].first / total : q[j].first;
    w[j] = mw.scale != 1.0f ? v * mw.scale : v;
    ids[j] = q[j].second;
  }
}

// out[H] = sum_j w[j] * picks[j, H], in pick order, each product rounded before its add (as
// torch's multiply then sum; no FMA contraction).
__attribute__((optimize("fp-contract=off")))
void weigh_picks(const float* picks, const float* w, int64_t k, int64_t H, float* out) {
  for (int64_t i = 0; i < H; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const float* y = picks + j * H;
    const float wj = w[j];
    for (int64_t i = 0; i < H; ++i) out[i] += wj * y[i];
  }
}

thread_local std::vector<int64_t> route_ids;
thread_local std::vector<float> route_weights;

// out[M, H] = the MoE MLP of each row of h[M, H]; picks: [k, H] scratch.
void moe_mlp(const float* h, int64_t M, int64_t H, const MoeWeights& mw, float* out,
             float* picks, int threads) {
  route_ids.resize(mw.k);
  route_weights.resize(mw.k);
  for (int64_t m = 0; m < M; ++m) {
    moe_route(h + m * H, H, mw, route_weights.data(), route_ids.data());
    moe_rows(h + m * H, route_ids.data(), mw.k, mw.gu, mw.down, mw.E, picks, threads);
    weigh_picks(picks, route_weights.data(), mw.k, H, out + m * H);
  }
}
"""

MOE_LAYER_ENTRY = r"""
extern "C" {

// weights[M, k], ids[M, k] = the router of each row x[M, H] (moe_route; for tests: the
// decoder's routing against torch's).
void pq_moe_route(const float* x, int64_t M, int64_t H, const MoeWeights* mw, float* weights,
                  int64_t* ids) {
  for (int64_t m = 0; m < M; ++m)
    moe_route(x + m * H, H, *mw, weights + m * mw->k, ids + m * mw->k);
}

}  // extern "C"
"""
