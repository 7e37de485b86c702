"""The C++ of the fused SwiGLU prefill MLP (spliced into ``source.KERNEL_SOURCE`` after the
SwiGLU helpers, before the entry points): ``down(silu(gate) · up)`` with ``[gate | up] = x @
gate_up.T`` where gate/up, SiLU·up and the quantising of the down projection's input are one
pass of the AVX-512 VNNI panel GEMM.

The unfused MLP writes ``[gate | up]`` ([M, 2I] floats: 37 MB for a 512-row chunk of
Qwen2.5-1.5B), reads it back for ``silu_rows`` into ``a`` ([M, I], 18 MB), and reads that
again to quantise it for the down GEMM: three sweeps of memory per layer that the cores wait
on. Here a panel holds 16 gate rows in lanes 0-15 and the same 16 outputs' up rows in lanes
16-31 (``pack_panel_2``), so a finished tile row has each output's gate and up side by side
in registers and ``store_row<true>`` applies ``silu_mul``; a thread takes its outputs as pairs
of such panels, so each row's 32 consecutive results are one quantisation block, quantised in
L1 by ``quantize_row`` straight into the down GEMM's int16 input (``gemm_vnni_q``). No float
[M, 2I] or [M, I] scratch: the chunk's MLP scratch is the int16 input (9 MB at 512 rows).

Numerics: the same int16 activations, the same int32 block sums, scaled and accumulated by
the same float operations in the same order as the panel GEMM's, the bias added as it adds
it, the very ``silu_mul`` and ``quantize_row`` on the results: bitwise the unfused
``proj_linear`` + ``silu_rows`` + ``proj_linear`` (``tests/unit/test_cpu_swiglu_gemm.py``).
Taken where both unfused GEMMs would run on VNNI with int16 activations (``g_vnni``, not
``g_act8``, ``linear``'s row thresholds), gate and up share one code format and I is a
multiple of 32; elsewhere ``swiglu_applies`` says no and ``pqx_mlp`` runs the steps as before
(``pq_set_swiglu(0)`` forces that, for benches and tests).
"""

SWIGLU_GEMM_SOURCE = r"""
// ------------------------------------------------------------------------- fused SwiGLU GEMM

int g_swiglu = 1;  // 0: pqx_mlp runs gate/up and SiLU as two steps everywhere (benches)

thread_local Panel panel_buf2;  // the second panel of a pair

// The rows [m, m + R) of both panels of a pair: 32 consecutive outputs of silu_mul(gate, up),
// each row's 32 then quantised as quantise_rows would quantise them (one block).
template <int R, int F>
VNNI_TARGET inline void swiglu_rows(const TileArgs& ta, const TileArgs& tb, bool min, int64_t m,
                                    const float* ba, const float* bb, Quantised& out, int64_t I,
                                    int64_t p0) {
  alignas(64) float t[8 * 32];
  if constexpr (R == 8) {
    if (min) {
      gemm_tile_vnni8r<true, scales_per_block(F), true>(ta, m, ba, t, 32, 16);
      gemm_tile_vnni8r<true, scales_per_block(F), true>(tb, m, bb, t + 16, 32, 16);
    } else {
      gemm_tile_vnni8r<false, scales_per_block(F), true>(ta, m, ba, t, 32, 16);
      gemm_tile_vnni8r<false, scales_per_block(F), true>(tb, m, bb, t + 16, 32, 16);
    }
  } else {
    gemm_tile_vnni_for<R, F, true>(ta, min, m, ba, t, 32, 16);
    gemm_tile_vnni_for<R, F, true>(tb, min, m, bb, t + 16, 32, 16);
  }
  const int64_t G = I / QK, g = p0 / QK;
  for (int r = 0; r < R; ++r)
    quantize_row(t + r * 32, 32, out.q + (m + r) * I + p0, out.d + (m + r) * G + g,
                 out.s + (m + r) * G + g);
}

// out = the down projection's input, quantised: silu_mul(gate, up) of [gate | up] = x @ (Wg |
// Wu).T, never stored as floats. A thread takes outputs 32 at a time as two panels of 16 gate
// + the same 16 up rows: one quantisation block per row and pair.
template <int F>
void swiglu_vnni(const float* x, int64_t M, const Weights& Wg, const Weights& Wu,
                 Quantised& out, int threads) {
  const Quantised& xq = quantise_rows(x, M, Wg.K, threads);
  const int64_t I = Wg.N, K = Wg.K;
  const bool min = Wg.mins != nullptr;
  over_rows(I, threads, [&](int64_t n0, int64_t n1) {
    Panel &P = panel_buf, &P2 = panel_buf2;
    P.reserve(K / QK);
    P2.reserve(K / QK);
    alignas(64) float bias[2][GNRV];
    alignas(64) float facc[8 * GNRV];
    const TileArgs ta{xq.q, xq.d, xq.s, P.w, P.sc, P.mn, facc, K};
    const TileArgs tb{xq.q, xq.d, xq.s, P2.w, P2.sc, P2.mn, facc, K};
    for (int64_t p0 = n0; p0 < n1; p0 += 32) {  // n0, n1 and I are multiples of 32
      pack_panel_2<F>(Wg, p0, n1, Wu, p0, n1, P);
      pack_panel_2<F>(Wg, p0 + 16, n1, Wu, p0 + 16, n1, P2);
      const float *ba = nullptr, *bb = nullptr;
      if (Wg.bias || Wu.bias) {
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < 16; ++i) {
            bias[h][i] = Wg.bias ? Wg.bias[p0 + 16 * h + i] : 0.0f;
            bias[h][16 + i] = Wu.bias ? Wu.bias[p0 + 16 * h + i] : 0.0f;
          }
        ba = bias[0];
        bb = bias[1];
      }
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) swiglu_rows<8, F>(ta, tb, min, m, ba, bb, out, I, p0);
      for (; m + GMR <= M; m += GMR) swiglu_rows<GMR, F>(ta, tb, min, m, ba, bb, out, I, p0);
      switch (M - m) {
        case 3: swiglu_rows<3, F>(ta, tb, min, m, ba, bb, out, I, p0); break;
        case 2: swiglu_rows<2, F>(ta, tb, min, m, ba, bb, out, I, p0); break;
        case 1: swiglu_rows<1, F>(ta, tb, min, m, ba, bb, out, I, p0); break;
        default: break;
      }
    }
  }, 32);
}

// The gate and up halves of a [gate | up] projection as two Weights of one format, or false
// (three row blocks, halves split unevenly, or two formats).
bool swiglu_halves(const Proj& gu, Weights& Wg, Weights& Wu, int64_t& fmt) {
  const int64_t I = gu.N / 2, K = gu.K, G = K / QK;
  if (gu.N % 2) return false;
  if (gu.n_parts == 1) {
    const Part& q = gu.part[0];
    const int F = (int)q.fmt;
    fmt = q.fmt;
    Wg = Weights{q.codes, q.scales, q.mins, q.bias, K, I};
    Wu = Weights{q.codes + I * G * block_bytes(F), q.scales + I * scale_row(F, K),
                 q.mins ? q.mins + I * min_row(F, K) : nullptr,
                 q.bias ? q.bias + I : nullptr, K, I};
    return true;
  }
  if (gu.n_parts != 2) return false;
  const Part &g = gu.part[0], &u = gu.part[1];
  if (g.rows != I || u.rows != I || g.fmt != u.fmt || (g.mins == nullptr) != (u.mins == nullptr))
    return false;
  fmt = g.fmt;
  Wg = Weights{g.codes, g.scales, g.mins, g.bias, K, I};
  Wu = Weights{u.codes, u.scales, u.mins, u.bias, K, I};
  return true;
}

// Whether the panel GEMM (not the row tiles) takes M rows at depth K, as linear picks.
inline bool takes_gemm(int64_t M, int64_t K) {
  return M >= GEMM_FROM && (K <= 1024 || M >= 2 * GEMM_FROM);
}

// Whether pqx_mlp runs fused (swiglu_mlp) for M rows: where both unfused steps would take the
// VNNI panel GEMM on int16 activations, and gate and up share a format.
bool swiglu_applies(int64_t M, const Proj& gu, const Proj& down) {
  Weights Wg{}, Wu{};
  int64_t fmt = 0;
  return g_swiglu && g_vnni && !g_act8 && down.K == gu.N / 2 && down.K % 32 == 0 &&
         takes_gemm(M, gu.K) && takes_gemm(M, down.K) && swiglu_halves(gu, Wg, Wu, fmt);
}

// y[M, H] = down(silu(gate) * up), [gate | up] = x @ gu.T; only where swiglu_applies. The
// down projection's input exists only quantised, in mlp_scratch (handed back after a prefill).
void swiglu_mlp(const float* x, int64_t M, const Proj& gu, const Proj& down, float* y,
                int threads) {
  Weights Wg{}, Wu{};
  int64_t fmt = 0;
  swiglu_halves(gu, Wg, Wu, fmt);
  const int64_t I = down.K, G = I / QK;
  mlp_scratch.resize((M * I + 1) / 2 + 2 * M * G + 16);
  Quantised a;  // a view of mlp_scratch (cap 0: never reserved or freed)
  a.q = (int16_t*)mlp_scratch.data();
  a.d = mlp_scratch.data() + (M * I + 1) / 2;
  a.s = a.d + M * G;
  if (fmt == F_Q4) swiglu_vnni<F_Q4>(x, M, Wg, Wu, a, threads);
  else if (fmt == F_Q4K) swiglu_vnni<F_Q4K>(x, M, Wg, Wu, a, threads);
  else if (fmt == F_Q8) swiglu_vnni<F_Q8>(x, M, Wg, Wu, a, threads);
  else if (fmt == F_Q6) swiglu_vnni<F_Q6>(x, M, Wg, Wu, a, threads);
  else swiglu_vnni<F_Q8G16>(x, M, Wg, Wu, a, threads);
  int64_t row = 0;
  for (int64_t i = 0; i < down.n_parts; ++i) {  // proj_linear's loop, on the quantised input
    const Part& q = down.part[i];
    const Weights W{q.codes, q.scales, q.mins, q.bias, I, q.rows, down.N};
    if (q.fmt == F_Q4) gemm_vnni_q<F_Q4>(a, M, W, y + row, threads);
    else if (q.fmt == F_Q4K) gemm_vnni_q<F_Q4K>(a, M, W, y + row, threads);
    else if (q.fmt == F_Q8) gemm_vnni_q<F_Q8>(a, M, W, y + row, threads);
    else if (q.fmt == F_Q6) gemm_vnni_q<F_Q6>(a, M, W, y + row, threads);
    else gemm_vnni_q<F_Q8G16>(a, M, W, y + row, threads);
    row += q.rows;
  }
}

}  // namespace

// 1: pqx_mlp fuses gate/up and SiLU where it can (the default), 0: never; -1 only asks.
extern "C" int pq_set_swiglu(int on) {
  if (on == 0 || on == 1) g_swiglu = on;
  return g_swiglu;
}

namespace {

"""
