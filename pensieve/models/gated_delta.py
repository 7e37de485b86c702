"""The gated delta rule (Gated DeltaNet's linear attention) and its short causal convolution:
the math of a recurrent layer, no engine.

Per value head the state ``S`` [Dk, Dv] evolves token by token as

    S ← exp(g_t) · S                         (gated decay, g_t ≤ 0)
    S ← S + k_t ⊗ β_t (v_t − Sᵀ k_t)         (delta-rule write of what S mispredicts)
    o_t = Sᵀ q_t                             (q scaled by 1/√Dk)

with q and k L2-normalised first (as the reference does, eps 1e-6 inside the root). Prefill
runs the chunked form (chunks of 64: a triangular solve per chunk condenses its delta-rule
writes into matmuls, then one sequential pass over chunks carries the state); decode the
recurrent form above. Both take an initial state and return the final one, float32.

Value heads may outnumber key heads (``Hv = r·Hk``). Which key head a value head reads is the
checkpoint's order: ``grouped`` (HF: value head h reads key head h // r) or ``tiled`` (llama.cpp's
Qwen3.5 GGUFs: h % Hk).

On CUDA, ``fla-core``'s kernels (``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``)
run instead when the package imports; the torch forms are the default and the CPU path.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

CHUNK = 64
L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    """x / √(Σx² + eps) over the last dim (the reference's and fla's form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def expand_heads(x: torch.Tensor, value_heads: int, order: str) -> torch.Tensor:
    """Key heads [..., Hk, D] → one per value head [..., Hv, D] in the checkpoint's ``order``."""
    r = value_heads // x.shape[-2]
    if r == 1:
        return x
    if order == "tiled":
        return x.repeat(*([1] * (x.ndim - 2)), r, 1)
    return x.repeat_interleave(r, dim=-2)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, T, Hk, Dk] → float32 [B, Hv, T, Dk], L2-normalised, q scaled by 1/√Dk."""
    hv = v.shape[2]
    q, k = (expand_heads(x, hv, order).transpose(1, 2).float() for x in (q, k))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k


def _heads_first(x: torch.Tensor, value_heads: int, order: str, length: int) -> torch.Tensor:
    """[B, T, H, *D] → float32 [B, Hv, length, *D] (key heads repeated per value head in
    ``order``, zero rows past T): the expansion, transpose and padding in one copy."""
    b, t, h = x.shape[:3]
    r, rest = value_heads // h, x.shape[3:]
    x = x.transpose(1, 2)  # [B, H, T, *D]
    if order == "tiled":
        out = x.new_zeros(b, r, h, length, *rest, dtype=torch.float32)
        out[:, :, :, :t] = x.unsqueeze(1)
    else:
        out = x.new_zeros(b, h, r, length, *rest, dtype=torch.float32)
        out[:, :, :, :t] = x.unsqueeze(2)
    return out.view(b, value_heads, length, *rest)


def chunk_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, *, order: str = "grouped", chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form. q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (log decay), beta [B, T, Hv];
    initial_state [B, Hv, Dk, Dv] (None: zeros). Returns (out [B, T, Hv, Dv] in v's dtype,
    final state [B, Hv, Dk, Dv] float32)."""
    b, t, hv, dv = v.shape
    dtype, dk = v.dtype, q.shape[-1]
    n = -(-t // chunk)
    length = n * chunk
    # normalised per key head (the same rows the reference normalises after repeating them)
    q, k = l2norm(q.float()), l2norm(k.float())
    q = q * dk ** -0.5
    q, k, v = (_heads_first(x, hv, order if x.shape[2] != hv else "grouped", length)
               for x in (q, k, v))
    g, beta = (_heads_first(x, hv, "grouped", length) for x in (g, beta))

    def chunks(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, hv, n, chunk, *x.shape[3:])

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    k_beta, v_beta = k * beta.unsqueeze(-1), v * beta.unsqueeze(-1)
    decay = g.cumsum(dim=-1)  # log of the decay from the chunk's start to each position
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    # within a chunk, exp(decay_i - decay_j) for j ≤ i (0 above the diagonal)
    within = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()
    # (I + strictly-lower(β k kᵀ ∘ decays)) is unit lower-triangular: solving against it turns
    # the chunk's sequential delta-rule writes into matmuls
    system = (k_beta @ k.transpose(-1, -2)) * within
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * decay.exp().unsqueeze(-1), upper=False,
                                      unitriangular=True)
    scores = (q @ k.transpose(-1, -2)) * within
    q_decayed = q * decay.exp().unsqueeze(-1)
    k_to_end = k * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]
    state = (torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=q.device)
             if initial_state is None else initial_state.float())
    out = torch.empty_like(u)
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ state  # what the state before the chunk mispredicts
        out[:, :, i] = q_decayed[:, :, i] @ state + scores[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(b, hv, n * chunk, dv)[:, :, :t].transpose(1, 2)
    return out.to(dtype), state


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, *, order: str = "grouped",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-by-token form (decode: T = 1, a row per sequence). Same shapes as
    ``chunk_gated_delta_rule``."""
    b, t, hv, dv = v.shape
    dtype = v.dtype
    q, k = _prepare(q, k, v, order)
    v, g, beta = v.transpose(1, 2).float(), g.transpose(1, 2).float(), beta.transpose(1, 2).float()
    dk = q.shape[-1]
    state = (torch.zeros(b, hv, dk, dv, dtype=torch.float32, device=q.device)
             if initial_state is None else initial_state.float().clone())
    s = state.view(b * hv, dk, dv)  # updated in place: a decode step reads and writes it once
    out = torch.empty_like(v)
    for i in range(t):
        s.mul_(g[:, :, i].exp().reshape(-1, 1, 1))
        k_i = k[:, :, i].reshape(-1, 1, dk)
        delta = (v[:, :, i].reshape(-1, 1, dv) - torch.bmm(k_i, s)) * beta[:, :, i].reshape(-1, 1, 1)
        s.baddbmm_(k_i.transpose(1, 2), delta)
        out[:, :, i] = torch.bmm(q[:, :, i].reshape(-1, 1, dk), s).view(b, hv, dv)
    return out.transpose(1, 2).to(dtype), state


@functools.cache
def _fla() -> Any | None:
    """fla-core's gated-delta-rule ops, or None when the package is absent (lazy: CUDA only)."""
    try:
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule as chunk, fused_recurrent_gated_delta_rule as recurrent,
        )
    except Exception:  # noqa: BLE001 - absent, or built for another torch/triton
        return None
    return chunk, recurrent


def fla_available() -> bool:
    return _fla() is not None


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, *, order: str = "grouped", decode: bool = False,
    use_fla: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form (``decode``: the recurrent one), on fla's CUDA kernels where they
    import and the tensors are on CUDA (``use_fla`` forces either way)."""
    if use_fla is None:
        use_fla = q.is_cuda and fla_available()
    if use_fla:
        return fla_gated_delta_rule(q, k, v, g, beta, initial_state, order=order, decode=decode)
    if decode:
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state, order=order)
    return chunk_gated_delta_rule(q, k, v, g, beta, initial_state, order=order)


def fla_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None, *, order: str = "grouped", decode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's kernels with the torch forms' conventions: key heads expanded to value heads here
    (in the checkpoint's order), L2 norm and the 1/√Dk scale inside the kernel."""
    ops = _fla()
    if ops is None:
        raise RuntimeError("fla-core is not installed (pip install 'pensieve[fla]')")
    chunk, recurrent = ops
    hv = v.shape[2]
    q, k = expand_heads(q, hv, order).contiguous(), expand_heads(k, hv, order).contiguous()
    state = None if initial_state is None else initial_state.float().contiguous()
    op = recurrent if decode else chunk
    out, final = op(q, k, v.contiguous(), g=g.float().contiguous(),
                    beta=beta.to(q.dtype).contiguous(), initial_state=state,
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    return out.to(v.dtype), final.float()


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution + SiLU over one sequence's new inputs.

    x [T, C]; weight [C, K]; state [C, K-1]: the K-1 inputs before x (None: zeros, a sequence's
    start). Returns (SiLU(conv) [T, C] in x's dtype, the new state [C, K-1] float32: the last
    K-1 inputs, older state included when T < K-1)."""
    c, kernel = weight.shape
    past = (torch.zeros(c, kernel - 1, dtype=x.dtype, device=x.device) if state is None
            else state.to(x.dtype))
    seq = torch.cat([past, x.t()], dim=1)  # [C, K-1+T]
    out = F.conv1d(seq.unsqueeze(0), weight.unsqueeze(1).to(x.dtype), groups=c)[0]
    return F.silu(out).t(), seq[:, seq.shape[1] - (kernel - 1):].float()


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One new input per sequence, batched: x [S, C], state [S, C, K-1] → (SiLU(conv) [S, C],
    new state [S, C, K-1] float32)."""
    seq = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [S, C, K]
    out = (seq * weight.to(x.dtype)).sum(dim=-1)
    return F.silu(out), seq[..., 1:].float()
