"""Latent (MLA) attention of a step's decode rows and short chunks in one Triton launch.

GLM-4.7-Flash and DeepSeek-V3 cache one vector per token and layer — the normalised KV latent
followed by the rotated rotary key (``PagedKV(1, rank + rope, 0)``) — and attend in latent
space: ``q_nope · W_UK`` is a query over the latent, the attention-weighted latent goes through
``W_UV`` (``models/deepseek_mla.py``). Without this module each sequence of a step attends on
its own; here every decode row of the step, and every chunk short against its cached context
(a follow-up turn's new tokens), attends in one launch of ``cuda_mla_kernels.latent_partial``
over the layer group's block tables (split-K, flash-decoding), then ``cuda_kernels.merge``
combines the splits. ``W_UK`` before and ``W_UV`` after stay in the model, batched over the rows.
A short cold prompt (nothing cached, at most ``COLD_TOKENS`` tokens) joins them: on the model's
own path each such prompt is a per-sequence loop of ~10 launches a layer (gather, ``kv_b``, two
concatenations, SDPA, the copy back), which a step of several short prompts (8 streams joining)
paid once per prompt and layer.

Where: a model that declares ``FastPaths.cuda_latent_attention`` on a CUDA hybrid runner
(``cuda_hybrid.CudaHybridBuilder`` with ``latent_heads``); the step's ``CudaHybridAttention``
then answers ``latent_rows`` / ``attend_latent``. Chunks longer than ``CHUNK_TOKENS`` or not
short against their context, and cold prompts past ``COLD_TOKENS``, keep the model's own
per-sequence path (FlashAttention over the expanded keys and values).
``PENSIEVE_LATENT_KERNEL=0`` (or ``PENSIEVE_HYBRID_KERNELS=0``) keeps every row there.

Importing this module needs no GPU; Triton loads on first kernel use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pensieve.backends.cuda_attention import _pow2, choose_num_splits
from pensieve.models.forward_context import SequenceSlice

ENV_SWITCH = "PENSIEVE_LATENT_KERNEL"
# a chunk of at most this many tokens over a context at least twice as long: a follow-up turn's
# new tokens (64-82 in Claude Code's turn 2 over a ~20k prefix). Up to session 10 the limit was
# 16: such a chunk took the model's own absorbed path, one SDPA of heads·n single-head rows of
# rank + rope (576) dims under a [heads·n, C] mask — on CUDA no flash kernel takes 576 dims,
# and the rows fill only ~heads·n/32 programs (the suspect for GLM-4.7-Flash's turn 2 at 961 ms,
# 20% of turn 1; not yet measured on the GPU). Here the rows tile the GPU with split-K. At
# GLM-4.7-Flash's dims the latent path reads less than expanding the context through kv_b up to
# ~200 new tokens (``MLAttention._absorb_rows``), about even at 256.
CHUNK_TOKENS = 256
# a prompt's first chunk (nothing cached) of at most this many tokens: the kernel's causal rows
# over the chunk's own latents (issue 15: GLM-4.7-Flash's step of 6 new prompts, 366 tokens,
# took 313 ms on the H100, its per-sequence loop ~47 layers × 6 prompts × ~10 launches; not yet
# measured with this). Longer cold chunks expand through kv_b, where FlashAttention's FLOPs win.
COLD_TOKENS = 64
MAX_RANK, MAX_ROPE = 512, 128  # the kernel's accumulator is [BLOCK_M, rank] per program
BLOCK_N = 32  # keys per inner tile
MAX_SPLITS = 32  # ``choose_num_splits``' cap

Rows = slice | torch.Tensor


def enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether a declaring model's latent layers take the kernel (``PENSIEVE_LATENT_KERNEL=0``:
    the model's per-sequence path)."""
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


def latent_layers(k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor],
                  layer_group: Sequence[int | None]) -> frozenset[int]:
    """Layers whose cache is a latent: one "head" of keys, no values."""
    return frozenset(i for i, g in enumerate(layer_group) if g is not None and
                     k_caches[i].dim() == 4 and k_caches[i].shape[2] == 1 and
                     0 < k_caches[i].shape[3] <= MAX_RANK + MAX_ROPE and v_caches[i].shape[-1] == 0)


def block_m(heads: int) -> int:
    """Flat (token, head) rows a program takes: a decode token's heads in one tile up to 32."""
    return 16 if heads <= 16 else 32


def takes(seq: SequenceSlice) -> bool:
    """A decode row, a chunk short against its cached context, or a short cold prompt."""
    if seq.query_len == 1:
        return True
    if seq.context_len == seq.query_len:  # nothing cached
        return seq.query_len <= COLD_TOKENS
    return seq.query_len <= CHUNK_TOKENS and seq.context_len >= 2 * seq.query_len


@dataclass(frozen=True)
class LatentBatch:
    """One layer group's latent rows of a step: which sequences, which rows of the flat batch
    (their tokens, in order), and the kernel's metadata over them."""

    sequences: frozenset[int]  # indices into the group's sequences
    rows: Rows  # the rows of the step's flat batch, sequence after sequence
    block_tables: torch.Tensor  # [S, width] int32, the chosen sequences' pages
    token_ctx: torch.Tensor  # [R] int32, keys each row sees (causal within its chunk)
    tile_seq: torch.Tensor  # [tiles] int32, row of ``block_tables``
    tile_lo: torch.Tensor  # [tiles] int32, first flat (token · heads + head) row
    tile_hi: torch.Tensor  # [tiles] int32, one past the last
    num_splits: int
    heads: int


def build_latent(seqs: list[SequenceSlice], heads: int, device: torch.device, num_sms: int
                 ) -> LatentBatch | None:
    """The kernel's metadata for the sequences it takes (None: none), one host→device copy."""
    chosen = [i for i, s in enumerate(seqs) if takes(s)]
    if not chosen:
        return None
    bm = block_m(heads)
    lens = [seqs[i].block_table.numel() for i in chosen]
    width = max(lens)
    table_idx = np.zeros((len(chosen), width), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    token_ctx: list[int] = []
    rows: list[int] = []
    tiles: list[tuple[int, int, int]] = []
    for k, i in enumerate(chosen):
        s = seqs[i]
        table_idx[k] = offsets[k] + np.minimum(np.arange(width), lens[k] - 1)
        first = len(token_ctx) * heads
        token_ctx.extend(range(s.context_len - s.query_len + 1, s.context_len + 1))
        rows.extend(range(s.query_start, s.query_start + s.query_len))
        end = len(token_ctx) * heads
        tiles.extend((k, lo, min(lo + bm, end)) for lo in range(first, end, bm))
    n_tab, n_tok, n_tiles = table_idx.size, len(token_ctx), len(tiles)
    # each int32 array the kernel reads starts 16-byte aligned, whatever the row and tile
    # counts: Triton specialises a pointer on its alignment, so an unaligned start would be
    # another compile (~0.5 s on first use) for some chunk lengths and not others
    tok_pad, tiles_pad = _round4(n_tok), _round4(n_tiles)
    segments = np.zeros(tok_pad + 3 * tiles_pad, dtype=np.int64)
    segments[:n_tok] = token_ctx
    for j, column in enumerate(np.asarray(tiles, dtype=np.int64).T):
        segments[tok_pad + j * tiles_pad:tok_pad + j * tiles_pad + n_tiles] = column
    host = np.concatenate([table_idx.reshape(-1), segments])
    dev = torch.from_numpy(host).to(device, non_blocking=True)
    flat = torch.cat([seqs[i].block_table for i in chosen]).to(device)
    table = flat[dev[:n_tab]].to(torch.int32).view(len(chosen), width)
    small = dev[n_tab:].to(torch.int32)
    tile = small[tok_pad:].view(3, tiles_pad)[:, :n_tiles]
    longest = max(seqs[i].context_len for i in chosen)
    splits = min(MAX_SPLITS, choose_num_splits(n_tiles, 1, longest, num_sms))
    return LatentBatch(frozenset(chosen), row_index(rows, device), table, small[:n_tok],
                       tile[0], tile[1], tile[2], splits, heads)


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def fits(rank: int, dim: int) -> bool:
    """Whether the kernel takes a latent of ``rank`` in a ``dim``-wide cache row."""
    return 0 < rank <= MAX_RANK and 0 <= dim - rank <= MAX_ROPE


def latent_attention(q: torch.Tensor, cache: torch.Tensor, batch: LatentBatch, rank: int,
                     scale: float) -> torch.Tensor:
    """q [R, H, rank + rope] (absorbed queries of ``batch.rows``) over the paged latent cache
    [blocks, page, 1, rank + rope] → [R, H, rank]: softmax(q · key · scale) · latent."""
    from pensieve.backends import cuda_kernels, cuda_mla_kernels

    r, heads, dim = q.shape
    rope = dim - rank
    if heads != batch.heads or cache.shape[-1] != dim or not fits(rank, dim):
        raise ValueError(f"latent kernel: q {tuple(q.shape)}, rank {rank}, cache "
                         f"{tuple(cache.shape)}, {batch.heads} heads expected")
    q = q.contiguous()
    s = batch.num_splits
    flat = r * heads
    m = torch.empty((flat, s), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    acc = torch.empty((flat, s, rank), dtype=torch.float32, device=q.device)
    out = torch.empty((r, heads, rank), dtype=q.dtype, device=q.device)
    rank_pad, rope_pad = max(16, _pow2(rank)), max(16, _pow2(rope))
    bt = batch.block_tables
    cuda_mla_kernels.latent_partial[(batch.tile_seq.numel(), s)](
        q, cache, bt, batch.tile_seq, batch.tile_lo, batch.tile_hi, batch.token_ctx,
        m, lse, acc, scale, s, q.stride(1), cache.stride(0), cache.stride(1), bt.stride(0),
        H=heads, RANK=rank, RANK_PAD=rank_pad, ROPE=rope, ROPE_PAD=rope_pad,
        PAGE=cache.shape[1], BLOCK_M=block_m(heads), BLOCK_N=BLOCK_N,
        IEEE=q.dtype == torch.float32, num_warps=8 if rank_pad >= 256 else 4, num_stages=2,
    )
    # one merge specialisation whatever the step's splits (it masks past ``s``): a chunk's
    # split count varies with its rows, and each new S_PAD would compile on first use (~0.5 s)
    cuda_kernels.merge[(r, heads)](
        m, lse, acc, out, m, s, out.stride(0), out.stride(1),
        D=rank, D_PAD=rank_pad, S_PAD=MAX_SPLITS, HAS_SINKS=False,
        num_warps=8 if rank_pad * MAX_SPLITS >= 8192 else 4,  # [splits, rank] float32 a program
    )
    return out


def row_index(rows: list[int], device: torch.device) -> Rows:
    """A slice where the rows are consecutive (decodes first, as is usual), else an index."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.long, device=device)
