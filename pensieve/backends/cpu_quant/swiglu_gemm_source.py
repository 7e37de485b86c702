"""The C++ of the fused SwiGLU prefill GEMM (spliced into ``source.KERNEL_SOURCE`` after the
SwiGLU helpers, before the entry points): ``a = silu(gate) · up`` with ``[gate | up] = x @
gate_up.T`` in one pass of the AVX-512 VNNI panel GEMM.

The unfused MLP writes ``[gate | up]`` ([M, 2I] floats: 37 MB for a 512-row chunk of
Qwen2.5-1.5B) and reads it back for ``silu_rows``: two sweeps of memory per layer that the
cores wait on. Here a panel holds 16 gate rows in lanes 0-15 and the same 16 outputs' up rows
in lanes 16-31 (``pack_panel_2``), so a finished tile row has each output's gate and up side
by side in registers and ``store_row<true>`` writes ``silu_mul`` of them straight into ``a``
([M, I]); the [M, 2I] scratch is never touched.

Numerics: the same int16 activations, the same int32 block sums, scaled and accumulated by
the same float operations in the same order as the panel GEMM's, the bias added as it adds
it, and ``silu_mul`` itself on the result: bitwise the unfused ``proj_linear`` + ``silu_rows``
(``tests/unit/test_cpu_swiglu_gemm.py``). Taken where the unfused path would run the VNNI
GEMM (``g_vnni``, not ``g_act8``, ``linear``'s row threshold), gate and up share one code
format, and I is a multiple of 16; elsewhere ``swiglu_applies`` says no and ``pqx_mlp`` runs
the two steps as before.
"""

SWIGLU_GEMM_SOURCE = r"""
// ------------------------------------------------------------------------- fused SwiGLU GEMM

int g_swiglu = 1;  // 0: pqx_mlp runs gate/up and SiLU as two steps everywhere (benches)

// a[M, I] = silu_mul(gate, up) of [gate | up] = x @ (Wg | Wu).T: panels of 16 gate + 16 up rows.
template <int F>
void swiglu_vnni(const float* x, int64_t M, const Weights& Wg, const Weights& Wu, float* a,
                 int threads) {
  const Quantised& xq = quantise_rows(x, M, Wg.K, threads);
  const int64_t I = Wg.N, K = Wg.K;
  const bool min = Wg.mins != nullptr;
  over_rows(I, threads, [&](int64_t n0, int64_t n1) {
    Panel& P = panel_buf;
    P.reserve(K / QK);
    alignas(64) float bias[GNRV];
    alignas(64) float facc[8 * GNRV];
    const TileArgs t{xq.q, xq.d, xq.s, P.w, P.sc, P.mn, facc, K};
    for (int64_t p0 = n0; p0 < n1; p0 += 16) {
      pack_panel_2<F>(Wg, p0, n1, Wu, p0, n1, P);
      const int cols = (int)(n1 - p0 < 16 ? n1 - p0 : 16);
      const float* b = nullptr;
      if (Wg.bias || Wu.bias) {
        for (int i = 0; i < 16; ++i) {
          bias[i] = Wg.bias && i < cols ? Wg.bias[p0 + i] : 0.0f;
          bias[16 + i] = Wu.bias && i < cols ? Wu.bias[p0 + i] : 0.0f;
        }
        b = bias;
      }
      float* y = a + p0;
      int64_t m = 0;
      for (; m + 8 <= M; m += 8) {
        if (min) gemm_tile_vnni8r<true, scales_per_block(F), true>(t, m, b, y + m * I, I, cols);
        else gemm_tile_vnni8r<false, scales_per_block(F), true>(t, m, b, y + m * I, I, cols);
      }
      for (; m + GMR <= M; m += GMR) gemm_tile_vnni_for<GMR, F, true>(t, min, m, b, y + m * I, I, cols);
      switch (M - m) {
        case 3: gemm_tile_vnni_for<3, F, true>(t, min, m, b, y + m * I, I, cols); break;
        case 2: gemm_tile_vnni_for<2, F, true>(t, min, m, b, y + m * I, I, cols); break;
        case 1: gemm_tile_vnni_for<1, F, true>(t, min, m, b, y + m * I, I, cols); break;
        default: break;
      }
    }
  }, 16);
}

// The gate and up halves of a [gate | up] projection as two Weights of one format, or false
// (three row blocks, halves split unevenly, or two formats).
bool swiglu_halves(const Proj& gu, Weights& Wg, Weights& Wu, int64_t& fmt) {
  const int64_t I = gu.N / 2, K = gu.K, G = K / QK;
  if (gu.N % 2) return false;
  if (gu.n_parts == 1) {
    const Part& q = gu.part[0];
    const int64_t SPB = scales_per_block((int)q.fmt), bytes = block_bytes((int)q.fmt);
    fmt = q.fmt;
    Wg = Weights{q.codes, q.scales, q.mins, q.bias, K, I};
    Wu = Weights{q.codes + I * G * bytes, q.scales + I * G * SPB, q.mins ? q.mins + I * G : nullptr,
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

// Whether pqx_mlp's gate/up step for M rows runs fused (swiglu_gemm): where the unfused step
// would take the VNNI panel GEMM on int16 activations.
bool swiglu_applies(int64_t M, const Proj& gu) {
  Weights Wg{}, Wu{};
  int64_t fmt = 0;
  const int64_t K = gu.K;
  return g_swiglu && g_vnni && !g_act8 && (gu.N / 2) % 16 == 0 && M >= GEMM_FROM &&
         (K <= 1024 || M >= 2 * GEMM_FROM) && swiglu_halves(gu, Wg, Wu, fmt);
}

// a[M, I] = silu(gate) * up, [gate | up] = x @ gu.T; only where swiglu_applies.
void swiglu_gemm(const float* x, int64_t M, const Proj& gu, float* a, int threads) {
  Weights Wg{}, Wu{};
  int64_t fmt = 0;
  swiglu_halves(gu, Wg, Wu, fmt);
  if (fmt == F_Q4) swiglu_vnni<F_Q4>(x, M, Wg, Wu, a, threads);
  else if (fmt == F_Q8) swiglu_vnni<F_Q8>(x, M, Wg, Wu, a, threads);
  else if (fmt == F_Q6) swiglu_vnni<F_Q6>(x, M, Wg, Wu, a, threads);
  else swiglu_vnni<F_Q8G16>(x, M, Wg, Wu, a, threads);
}

}  // namespace

// 1: pqx_mlp fuses gate/up and SiLU where it can (the default), 0: never; -1 only asks.
extern "C" int pq_set_swiglu(int on) {
  if (on == 0 || on == 1) g_swiglu = on;
  return g_swiglu;
}

namespace {

"""
