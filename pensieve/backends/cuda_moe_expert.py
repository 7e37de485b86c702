"""The MoE expert GEMV at a few tokens, expert-major (``cuda_moe_expert_kernels.expert_gemv``):
each routed expert's weights read once for every token that picked it, where ``pick_gemv``
reads them once a pick. One launch a projection, the grid (experts, output tiles) fixed by the
shapes, no host sync: the decode CUDA graphs capture it.

Opt-in: on the H100 (2026-12-07) it ran 271 µs a call against ``pick_gemv``'s 170 at
gpt-oss-20b's 8 rows. ``PENSIEVE_MOE_EXPERT_GEMV``: unset or "0" never (``pick_gemv``), "1" at
every 2..``MAX_TOKENS`` tokens, "auto" where the picks are expected to share experts
(``expected_sharing``: uniform routing's picks per distinct expert ≥ ``MIN_SHARING`` —
gpt-oss-20b's 32 experts at top-4 from 8 tokens (~1.5), GLM-4.7-Flash's 64 at top-4 and
Qwen3-30B-A3B's 128 at top-8 only at 16 (~1.55; 1.24 at 8), never Qwen3.6's 256 at top-8).
``bench/gpu_moe_kernels`` forces each route. ``cuda_moe_tune`` races it against the others per
decode bucket at start (with a swap-AB tile too; packed MXFP4 included); its plan, where there
is one, decides instead of this switch.
"""

from __future__ import annotations

import os

import torch

ENV_SWITCH = "PENSIEVE_MOE_EXPERT_GEMV"
MAX_TOKENS = 16  # rows of one tensor-core tile (BLOCK_M); beyond, pick_gemv / grouped
MIN_SHARING = 1.4  # unmeasured: gpt-oss-20b at 8 tokens is 1.52
# sm_90 builds (fused gate/up, 16 rows): int8 128 registers, int4 98, 6-bit 172, no spills;
# BLOCK_K 128 or 4 warps reach 250+ (6-bit spills); untimed on a GPU
BLOCK_N = 32
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 2


def expected_sharing(tokens: int, experts: int, top_k: int) -> float:
    """Picks per distinct expert hit under uniform routing: T·k / (E·(1 − (1 − k/E)^T))."""
    hit = experts * (1.0 - (1.0 - top_k / experts) ** tokens)
    return tokens * top_k / max(hit, 1e-9)


def wanted(tokens: int, experts: int, top_k: int, environ: dict[str, str] | None = None) -> bool:
    """Whether ``moe_experts`` takes the expert-major GEMV at ``tokens`` decode rows."""
    mode = (os.environ if environ is None else environ).get(ENV_SWITCH, "0")
    if mode not in ("1", "auto") or not 2 <= tokens <= MAX_TOKENS:
        # off by default ("0"): 271 µs a call against pick_gemv's 170 at gpt-oss-20b's 8 rows
        # (H100, 2026-12-07); "auto": where uniform routing shares experts, "1": always
        return False
    return mode == "1" or expected_sharing(tokens, experts, top_k) >= MIN_SHARING


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def expert_gemv(x: torch.Tensor, ids: torch.Tensor, rw: torch.Tensor, st, y: torch.Tensor, *,
                tokens: int, experts: int, topk: int, gather: bool, fuse: bool, routed: bool,
                glu=None, t=None) -> torch.Tensor:  # noqa: ANN001 (cuda_moe's Stack, Glu, Tiles)
    """y [P, N_out] for the flat token-major picks ``ids`` [T·topk] (as ``cuda_moe.pick_gemv``,
    the weights of each picked expert read once). ``t``: tiles (block_n, block_k, warps,
    stages, swap; block_m is the tokens' power of two) instead of the module's constants."""
    from pensieve.backends import cuda_moe_expert_kernels as k
    from pensieve.backends.cuda_int4 import triton_cdiv
    from pensieve.backends.cuda_moe import _block_k, _meta

    n_out = st.n // 2 if fuse else st.n
    args, meta = _meta(st, glu if fuse else None)
    bn, bk, warps, stages, swap = ((BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES, False) if t is None
                                   else (t.block_n, t.block_k, t.num_warps, t.num_stages, t.swap))
    k.expert_gemv[(experts, triton_cdiv(n_out, bn))](
        x, ids, rw, *args, y, tokens, st.n, st.k, x.stride(0), y.stride(0), TOPK=topk,
        K_PAD=_pow2(topk), GATHER=gather, FUSE=fuse, ROUTED=routed, **meta,
        BLOCK_M=max(16, _pow2(tokens)), BLOCK_N=bn, BLOCK_K=_block_k(st.k, bk),
        num_warps=warps, num_stages=stages, **({"SWAP": True} if swap else {}))
    return y
