"""Attention over the paged KV cache on CUDA: a batched decode kernel and varlen prefill.

The model calls ``paged_attention`` (``models/forward_context.py``), which hands the work to
the ``CudaPagedAttention`` the model runner put in the ``ForwardContext``. The flat batch is
laid out decodes first: rows ``[0, num_decodes)`` are single-token queries, the rest are
prefill chunks, one sequence after another.

- **Decode**: one Triton launch for all decode rows (flash-decoding: each program reads a
  slice of one sequence's pages for one KV head and all of its query heads, then a second
  small kernel merges the slices). Its grid depends only on the batch size, so a CUDA graph
  replays it whatever the context lengths are.
- **Short chunk** (one sequence, a few new tokens after a cached prefix — an agent's
  follow-up turn): a variant of the decode kernel that packs 16 // group query tokens of
  the chunk with their query heads into one program's rows, causal per row, reading the
  pages directly; its grid depends only on the chunk's token bucket, for CUDA graphs.
- **Prefill** (chunks with or without a cached prefix): the sequences' K/V are gathered from
  their pages into one contiguous varlen batch, then FlashAttention-2's varlen kernel (in
  PyTorch) runs causal attention aligned bottom-right — the i-th new token sees the cached
  prefix and new tokens up to itself. float32 caches (tests) use SDPA per sequence instead.

Importing this module needs no GPU; Triton is imported lazily on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

QKNorm = tuple[torch.Tensor, torch.Tensor, float]  # per-head RMSNorm: q weight, k weight, eps
_PAD_GROUP = 16  # query heads per KV head, padded up to tl.dot's smallest M
_BLOCK_N = 64  # keys per inner tile of the decode kernel


@dataclass(frozen=True)
class PrefillBatch:
    """The prefill rows of a step as one varlen batch (all on the device except the ints)."""

    cu_seqlens_q: torch.Tensor  # [P+1] int32, offsets of each sequence's new tokens
    cu_seqlens_k: torch.Tensor  # [P+1] int32, offsets of each sequence's whole context
    kv_slots: torch.Tensor  # [sum(context_len)] int64, cache slot of every context token
    max_q: int
    max_k: int
    query_lens: tuple[int, ...]  # for the SDPA fallback
    context_lens: tuple[int, ...]


@dataclass(frozen=True)
class DecodeBatch:
    block_tables: torch.Tensor  # [B, max_blocks] int32 (rows may be longer than needed)
    context_lens: torch.Tensor  # [B] int32, tokens each sequence attends to (≥ 1)
    num_splits: int  # slices of each sequence's context read in parallel


@dataclass(frozen=True)
class ChunkBatch:
    """One sequence's short chunk: every row of the batch is one of its new tokens."""

    block_table: torch.Tensor  # [max_blocks] int32, the sequence's pages
    start: torch.Tensor  # [1] int32, position of the chunk's first token
    num_tokens: torch.Tensor  # [1] int32, real rows (rows past it are padding)
    num_splits: int


class CudaPagedAttention:
    """Per-step attention metadata plus the code that uses it; see the module docstring."""

    def __init__(self, num_decodes: int, decode: DecodeBatch | None,
                 prefill: PrefillBatch | None, chunk: ChunkBatch | None = None) -> None:
        self.num_decodes = num_decodes
        self.decode = decode
        self.prefill = prefill
        self.chunk = chunk

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,  # noqa: ANN001
                 qk_norm: QKNorm | None = None) -> torch.Tensor:
        """q/k before RoPE when ``cos_sin`` is given: rotated and stored in one kernel (and
        RMS-normed per head first, with ``qk_norm``'s weights: Qwen3, ``cuda_layers``)."""
        k_cache, v_cache = ctx.k_caches[layer], ctx.v_caches[layer]
        if cos_sin is None:
            if qk_norm is not None:
                q, k = _torch_qk_norm(q, k, qk_norm)
            store_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
        else:
            q = rope_and_store(q, k, v, cos_sin, ctx.slot_mapping, k_cache, v_cache, qk_norm)
        if self.chunk is not None:
            return paged_chunk(q, k_cache, v_cache, self.chunk)
        nd = self.num_decodes
        if self.prefill is None:
            return paged_decode(q, k_cache, v_cache, self.decode)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode(q[:nd], k_cache, v_cache, self.decode)
        out[nd:] = prefill_attention(q[nd:], k_cache, v_cache, self.prefill)
        return out


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    heads, dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, heads, dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slots, v.to(v_cache.dtype))


def _torch_qk_norm(q: torch.Tensor, k: torch.Tensor,
                   norm: QKNorm) -> tuple[torch.Tensor, torch.Tensor]:
    qw, kw, eps = norm
    return F.rms_norm(q, (q.shape[-1],), qw, eps), F.rms_norm(k, (k.shape[-1],), kw, eps)


def rope_and_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos_sin: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor,
                   qk_norm: QKNorm | None = None) -> torch.Tensor:
    """RoPE (rotate-half) on q and k, k and v into their cache slots; returns rotated q.

    One launch instead of ~12 small ones (the elementwise RoPE ops and two index copies);
    q/k/v may be strided views of the fused qkv projection. Arithmetic in float32.
    ``qk_norm`` (q weight, k weight, eps): each head RMS-normed first, in the same launch
    (``cuda_rope_kernels.rope_norm``; two ``F.rms_norm`` launches fewer, same roundings).
    """
    t, hq, d = q.shape
    hk = k.shape[1]
    cos, sin = (x.reshape(t, d) for x in cos_sin)
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    for x in (q, k, v, k_cache):
        if x.stride(-1) != 1:
            raise ValueError("rope_and_store needs unit stride along head_dim")
    if qk_norm is not None:
        from pensieve.backends import cuda_rope_kernels

        qw, kw, eps = qk_norm
        cuda_rope_kernels.rope_norm[(t,)](
            q, k, v, cos, sin, slots, out, k_cache, v_cache, qw, kw, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), sin.stride(0), k_cache.stride(1), k_cache.stride(2),
            HQ=hq, HK=hk, HQ_PAD=_pow2(hq), HK_PAD=_pow2(hk), HALF=d // 2,
            HALF_PAD=_pow2(d // 2), num_warps=4,
        )
        return out
    _kernels().rope[(t,)](
        q, k, v, cos, sin, slots, out, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), k_cache.stride(1), k_cache.stride(2),
        HQ=hq, HK=hk, HQ_PAD=_pow2(hq), HK_PAD=_pow2(hk), HALF=d // 2, HALF_PAD=_pow2(d // 2),
        num_warps=4,
    )
    return out


# --------------------------------------------------------------------------- decode


def choose_num_splits(batch: int, kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough programs to fill the GPU about twice, never a slice shorter than one tile."""
    programs = batch * kv_heads
    want = max(1, -(-2 * num_sms // programs))
    by_len = max(1, -(-max_context // _BLOCK_N))
    return int(min(want, by_len, 32))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: DecodeBatch, window: int | None = None,
                 sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one new token per sequence) → [B, Hq, D], attending over its pages (its
    last ``window`` keys, where given); ``sinks`` [Hq]: a logit per head in the softmax's
    denominator (gpt-oss). Hybrid layouts pass them per layer (``cuda_hybrid.py``)."""
    kernels = _kernels()
    b, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    if group > _PAD_GROUP:
        raise ValueError(f"{group} query heads per KV head; the decode kernel takes ≤ {_PAD_GROUP}")
    s = meta.num_splits
    q = q.contiguous()
    m = torch.empty((b, hq, s), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty((b, hq, s, d), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    bt = meta.block_tables
    kernels.partial[(b, hk, s)](
        q, k_cache, v_cache, bt, meta.context_lens, m, lse, acc,
        1.0 / math.sqrt(d), s, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        bt.stride(0),
        GROUP=group, GROUP_PAD=_PAD_GROUP, D=d, D_PAD=_pow2(d), PAGE=k_cache.shape[1],
        BLOCK_N=_BLOCK_N, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    kernels.merge[(b, hq)](
        m, lse, acc, out, m if sinks is None else sinks.float().contiguous(), s,
        out.stride(0), out.stride(1),
        D=d, D_PAD=_pow2(d), S_PAD=_pow2(s), HAS_SINKS=sinks is not None, num_warps=4,
    )
    return out


def paged_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: ChunkBatch, window: int | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D], rows = one sequence's new tokens (first ``meta.num_tokens`` real) →
    [T, Hq, D]; row i sees the cached prefix and new tokens up to itself (its last ``window``
    keys, where given); ``sinks`` as in ``paged_decode``."""
    kernels = _kernels()
    t, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    group_p2 = _pow2(group)
    if group_p2 > _PAD_GROUP:
        raise ValueError(f"{group} query heads per KV head; the chunk kernel takes ≤ {_PAD_GROUP}")
    tok = _PAD_GROUP // group_p2
    s = meta.num_splits
    q = q.contiguous()
    m = torch.empty((t, hq, s), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty((t, hq, s, d), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    kernels.chunk_partial[(-(-t // tok), hk, s)](
        q, k_cache, v_cache, meta.block_table, meta.start, meta.num_tokens, m, lse, acc,
        1.0 / math.sqrt(d), s, hq, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_P2=group_p2, TOK=tok, D=d, D_PAD=_pow2(d), PAGE=k_cache.shape[1],
        BLOCK_N=_BLOCK_N, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    kernels.merge[(t, hq)](
        m, lse, acc, out, m if sinks is None else sinks.float().contiguous(), s,
        out.stride(0), out.stride(1),
        D=d, D_PAD=_pow2(d), S_PAD=_pow2(s), HAS_SINKS=sinks is not None, num_warps=4,
    )
    return out


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernels():  # noqa: ANN202 - the module of Triton kernels
    """The Triton kernels, imported on first use (so this module imports without Triton)."""
    from pensieve.backends import cuda_kernels

    return cuda_kernels


# --------------------------------------------------------------------------- prefill


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: PrefillBatch) -> torch.Tensor:
    """q [Tp, Hq, D] (the prefill rows) → [Tp, Hq, D], causal aligned bottom-right."""
    hk, d = k_cache.shape[2], k_cache.shape[3]
    keys = k_cache.view(-1, hk, d).index_select(0, meta.kv_slots)
    values = v_cache.view(-1, hk, d).index_select(0, meta.kv_slots)
    if flash_varlen_available(q.dtype):
        out = torch.ops.aten._flash_attention_forward(
            q, keys, values, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_q, meta.max_k,
            0.0, True, False, scale=1.0 / math.sqrt(d),
        )[0]
        return out
    return _prefill_sdpa(q, keys, values, meta)


_FLASH_STATE: dict[str, bool] = {}


def flash_varlen_available(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16) and _flash_varlen_works()


def _flash_varlen_works() -> bool:
    """Whether PyTorch's FlashAttention varlen op runs here (checked once, on a tiny input)."""
    if "ok" not in _FLASH_STATE:
        try:
            dev = torch.device("cuda")
            q = torch.randn(3, 2, 64, device=dev, dtype=torch.bfloat16)
            kv = torch.randn(5, 1, 64, device=dev, dtype=torch.bfloat16)
            cu_q = torch.tensor([0, 3], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, 5], dtype=torch.int32, device=dev)
            out = torch.ops.aten._flash_attention_forward(
                q, kv, kv, cu_q, cu_k, 3, 5, 0.0, True, False, scale=0.125)[0]
            ref = _sdpa_bottom_right(q.float(), kv.float(), kv.float())
            _FLASH_STATE["ok"] = bool((out.float() - ref).abs().max() < 2e-2)
        except (RuntimeError, TypeError):
            _FLASH_STATE["ok"] = False
    return _FLASH_STATE["ok"]


def _prefill_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  meta: PrefillBatch) -> torch.Tensor:
    out = torch.empty_like(q)
    qs = ks = 0
    for ql, kl in zip(meta.query_lens, meta.context_lens):
        out[qs:qs + ql] = _sdpa_bottom_right(q[qs:qs + ql], keys[ks:ks + kl], values[ks:ks + kl])
        qs, ks = qs + ql, ks + kl
    return out


def _sdpa_bottom_right(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [L, Hq, D], k/v [S, Hk, D]; query i sees keys up to S - L + i."""
    ql, kl = q.shape[0], k.shape[0]
    rows = torch.arange(ql, device=q.device).unsqueeze(1) + (kl - ql)
    mask = torch.arange(kl, device=q.device).unsqueeze(0) <= rows
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0).to(q.dtype),
        v.transpose(0, 1).unsqueeze(0).to(q.dtype), attn_mask=mask,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)
