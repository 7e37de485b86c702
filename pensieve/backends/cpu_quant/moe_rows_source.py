"""The C++ of one decode token's MoE experts in one call (``pqx_moe_rows``).

A decode step's token runs k picked experts' SwiGLU MLPs. One ``pqx_mlp`` call per pick is
three fork/joins of the thread pool (gate_up GEMV, SiLU, down GEMV) over a ~3.6 MB matrix,
whose fork/join and ramp-up cost shows at that size (~13.7 GB/s where the dense one-call
decoder streams ~17). Here the k experts' gate_up rows are one parallel pass (every expert's
parts, each split in ``NB``-row sub-tiles, one range of work units over the threads), SiLU·up
for all k runs on the caller, then the k down projections are one more pass: two fork/joins a
layer instead of 3·k.

Bitwise the per-expert path: each sub-tile starts at a multiple of ``NB`` rows of its part and
runs the row tiles exactly as ``small_linear`` runs a one-row call there (``one_row_tiles``),
so every output row comes from the same tile call on the same quantised activations, whoever
runs it. The activation quantisation is per row, so quantising x once for every expert's
gate_up, and the k SiLU outputs as k rows at once, gives the same int16 blocks as one call
per expert.

The first part sits inside the kernels' namespace (after ``small_linear``), the entry point in
``extern "C"`` (``MOE_ROWS_ENTRY``).
"""

MOE_ROWS_SOURCE = r"""
// ------------------------------------------------------------------------- MoE, one token

// One part of one expert's projection against activation row `m` of the quantised input,
// written at y: what the threads share, in NB-row sub-tiles ([first, first + tiles)).
struct MoeSeg {
  Weights W;
  int64_t fmt, m, first, tiles;
  float* y;
};

template <int F>
void seg_rows(const MoeSeg& s, const Quantised& xq, int64_t n0, int64_t n1) {
  one_row_tiles<F>(s.W, xq, s.m, s.y, n0, n1);
}

// Sub-tiles [t0, t1) of the segments (in order; a range may span several segments).
void moe_tiles(const std::vector<MoeSeg>& segs, const Quantised& xq, int64_t t0, int64_t t1) {
  size_t i = 0;
  for (int64_t t = t0; t < t1; ++t) {
    while (t >= segs[i].first + segs[i].tiles) ++i;
    const MoeSeg& s = segs[i];
    const int64_t n0 = (t - s.first) * NB, n1 = n0 + NB < s.W.N ? n0 + NB : s.W.N;
    if (s.fmt == F_Q4) seg_rows<F_Q4>(s, xq, n0, n1);
    else if (s.fmt == F_Q4K) seg_rows<F_Q4K>(s, xq, n0, n1);
    else if (s.fmt == F_Q8) seg_rows<F_Q8>(s, xq, n0, n1);
    else if (s.fmt == F_Q6) seg_rows<F_Q6>(s, xq, n0, n1);
    else seg_rows<F_Q8G16>(s, xq, n0, n1);
  }
}

// Appends projection p's parts, against activation row m and written at y (its N outputs);
// returns the sub-tile count so far.
int64_t add_segs(std::vector<MoeSeg>& segs, const Proj& p, int64_t m, float* y, int64_t tiles) {
  int64_t row = 0;
  for (int64_t i = 0; i < p.n_parts; ++i) {
    const Part& q = p.part[i];
    const int64_t n = (q.rows + NB - 1) / NB;
    segs.push_back(MoeSeg{Weights{q.codes, q.scales, q.mins, q.bias, p.K, q.rows, p.N},
                          q.fmt, m, tiles, n, y + row});
    tiles += n;
    row += q.rows;
  }
  return tiles;
}

// All the segments' rows in one parallel pass (ranges of whole sub-tiles, over_rows' balance).
void moe_pass(const std::vector<MoeSeg>& segs, int64_t tiles, const Quantised& xq, int threads) {
  over_rows(tiles, threads, [&](int64_t t0, int64_t t1) { moe_tiles(segs, xq, t0, t1); }, 1);
}

thread_local std::vector<MoeSeg> moe_segs;

// y[j, H] = expert ids[j]'s SwiGLU MLP of the one row x[H], j < k (gu[e], down[e]: expert e's
// projections, e < E). Returns the position of the first id outside [0, E) (nothing written),
// or -1.
int64_t moe_rows(const float* x, const int64_t* ids, int64_t k, const Proj* const* gu,
                 const Proj* const* down, int64_t E, float* y, int threads) {
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] < 0 || ids[j] >= E) return j;
  if (k == 0) return -1;
  const int64_t H = gu[ids[0]]->K, I = down[ids[0]]->K;
  mlp_scratch.resize(k * 3 * I);
  float* h = mlp_scratch.data();  // [k, 2I]: each pick's [gate | up]
  float* a = h + k * 2 * I;       // [k, I]: silu(gate) * up
  std::vector<MoeSeg>& segs = moe_segs;
  segs.clear();
  int64_t tiles = 0;
  for (int64_t j = 0; j < k; ++j) tiles = add_segs(segs, *gu[ids[j]], 0, h + j * 2 * I, tiles);
  moe_pass(segs, tiles, quantise(x, 1, H), threads);
  for (int64_t j = 0; j < k; ++j) silu_mul(h + j * 2 * I, h + j * 2 * I + I, I, a + j * I);
  segs.clear();
  tiles = 0;
  for (int64_t j = 0; j < k; ++j) tiles = add_segs(segs, *down[ids[j]], j, y + j * H, tiles);
  moe_pass(segs, tiles, quantise(a, k, I), threads);
  return -1;
}
"""

MOE_ROWS_ENTRY = r"""
extern "C" {

// One token through its k picked experts (SwiGLU), each pick's output a row of y[k, H]; the
// experts' projections as tables of E Proj pointers. The first bad id's position, or -1.
int64_t pqx_moe_rows(const float* x, const int64_t* ids, int64_t k, const Proj* const* gu,
                     const Proj* const* down, int64_t E, float* y, int threads) {
  return moe_rows(x, ids, k, gu, down, E, y, threads);
}

}  // extern "C"
"""
