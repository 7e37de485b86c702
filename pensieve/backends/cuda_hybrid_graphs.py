"""A hybrid layout's decode steps as CUDA graphs: one per row bucket (1, 2, 4, 8 … max seats).

Hybrid layouts (Gated DeltaNet + attention, windows + sinks, latent attention) otherwise run
every step eagerly: at batch 1 the Python and launch overhead of ~40 layers × several kernels
is most of a step. Here a pure-decode step (every chunk one token, ``StaticDecode.can_run``)
fills ``hybrid_static.StaticDecode``'s buffers and replays the bucket's graph; the attention
layers run on ``cuda_hybrid``'s decode kernel (and ``cuda_mla``'s latent kernel) over the static
block tables, the recurrent layers on their batched decode step (``RecurrentStates.cached``).
A restored state checkpoint is copied into its slot before the replay, a slot into its
checkpoint after (``HybridCaches.restore`` / ``save``), as the eager step does. Prefill and
mixed steps stay eager. A decode row's token may come from the previous step's sampled ids
on the device, so async scheduling chains these steps (``ModelRunner.can_carry``).

On by default (``PENSIEVE_HYBRID_GRAPHS=0`` turns it off; read when the model runner starts):
on an H100 (2026-12-06) greedy tokens with the graphs equal the eager ones for Qwen3.5-MoE,
gpt-oss and GLM-4.7-Flash, the graphs captured and replayed (``tests/unit/test_cuda_hybrid_graphs.py``),
where the eager decode step ran 34–69 ms on the real shapes. Only where every paged layer runs on the kernels (a layer left to the per-sequence
loop would loop over host lengths); a capture that fails (a host sync, such as the torch MoE
path's expert counts, or a kernel that declines) logs a warning and leaves the eager path.
Captures reuse ``cuda_capture.capture_graph`` and ``cuda_graph_runner.bucket_sizes``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch
from torch import nn

from pensieve.backends.cuda_attention import DecodeBatch, choose_num_splits
from pensieve.backends.cuda_capture import capture_graph
from pensieve.backends.cuda_graph_runner import bucket_sizes
from pensieve.backends.cuda_hybrid import CudaHybridAttention, CudaHybridBuilder, GroupBatch
from pensieve.backends.cuda_mla import LatentBatch, block_m
from pensieve.backends.hybrid_cache import HybridCaches
from pensieve.backends.hybrid_static import StaticDecode
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.forward_context import ForwardContext

log = logging.getLogger(__name__)
ENV_SWITCH = "PENSIEVE_HYBRID_GRAPHS"


def enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether hybrid decode steps are captured (on unless ``PENSIEVE_HYBRID_GRAPHS=0``)."""
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


class NotCapturable(RuntimeError):
    """A static step met a layer the kernels decline: its capture fails, the runner stays eager."""


class StaticCudaAttention(CudaHybridAttention):
    """``CudaHybridAttention`` over static buffers with no per-sequence fallback."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ctx: ForwardContext, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
                 *, window: int | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        if not self.takes(layer, q, ctx.k_caches[layer]):
            raise NotCapturable(f"layer {layer}: the decode kernel declines q {tuple(q.shape)}")
        return super().__call__(layer, q, k, v, ctx, cos_sin, window=window, sinks=sinks)

    def attend_latent(self, layer: int, q: torch.Tensor, cache: torch.Tensor, rank: int,
                      scale: float) -> torch.Tensor:
        out = super().attend_latent(layer, q, cache, rank, scale)
        if out is None:
            raise NotCapturable(f"layer {layer}: the latent kernel declines rank {rank}")
        return out


def uncovered_layers(caches: HybridCaches, builder: CudaHybridBuilder) -> list[int]:
    """Paged layers neither kernel takes (they would run the per-sequence loop)."""
    return [i for i, g in enumerate(caches.layer_group)
            if g is not None and i not in builder.kernels and i not in builder.latent]


def latent_tiles(b: int, heads: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The latent kernel's (tile_seq, tile_lo, tile_hi) for ``b`` decode rows: each row's
    heads in tiles of ``block_m(heads)`` flat rows (``cuda_mla.build_latent``'s, for decodes)."""
    bm = block_m(heads)
    tiles = [(k, lo, min(lo + bm, (k + 1) * heads))
             for k in range(b) for lo in range(k * heads, (k + 1) * heads, bm)]
    t = torch.tensor(tiles, dtype=torch.int32, device=device).T.contiguous()
    return t[0], t[1], t[2]


def static_attention(builder: CudaHybridBuilder, static: StaticDecode, b: int, num_sms: int
                     ) -> StaticCudaAttention:
    """The bucket-``b`` backend: per group a ``DecodeBatch`` (and ``LatentBatch``) over the
    static tables and lengths; splits sized for the longest context a row may have."""
    longest = static.max_blocks * static.block_size
    groups = []
    for g in range(static.groups):
        slots, table, lens = static.slots[g, :b], static.tables[g, :b], static.lens[:b]
        seqs = static.sequences(b)[g]
        decode = latent = None
        if g in builder.plain_groups:
            window = builder.windows[g]
            keys = min(window, longest) if window else longest
            decode = DecodeBatch(table, lens, choose_num_splits(b, builder.kv_heads[g], keys,
                                                                num_sms))
        if g in builder.latent_groups:
            assert builder.latent_heads is not None
            seq, lo, hi = latent_tiles(b, builder.latent_heads, lens.device)
            latent = LatentBatch(frozenset(range(b)), slice(0, b), table, lens, seq, lo, hi,
                                 choose_num_splits(seq.numel(), 1, longest, num_sms),
                                 builder.latent_heads)
        groups.append(GroupBatch(decode, None, seqs, slots, [], latent))
    return StaticCudaAttention(builder.layer_group, groups, None, None, 0, builder.kernels,
                               builder.latent)


class HybridGraphRunner:
    """Captured hybrid decode buckets over ``StaticDecode`` (module docstring)."""

    def __init__(self, model: nn.Module, caches: HybridCaches, builder: CudaHybridBuilder,
                 max_batch: int, max_blocks: int) -> None:
        self.model, self.caches = model, caches
        self.buckets = bucket_sizes(max_batch)
        self.static = StaticDecode(caches, self.buckets[-1], max_batch, max_blocks)
        sms = builder.num_sms
        self.backends = {b: static_attention(builder, self.static, b, sms) for b in self.buckets}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.replays = 0

    @torch.inference_mode()
    def capture(self, pool) -> None:  # noqa: ANN001 - a CUDA graph memory pool handle
        """Every bucket, largest first, over padding rows only (their writes go to scratch)."""
        torch.cuda.synchronize()
        for b in reversed(self.buckets):
            self._graphs[b], self._outputs[b] = capture_graph(
                lambda b=b: self.static.forward(self.model, b, self.backends[b]), pool)
        torch.cuda.synchronize()

    def can_run(self, chunks: Sequence[ScheduledChunk]) -> bool:
        return self.static.can_run(chunks)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None = None,
            carried_rows: Sequence[int] = ()) -> torch.Tensor:
        """Logits [S, V] of the chunks that complete, in order (``ModelRunner.run``'s contract)."""
        bucket = next(b for b in self.buckets if b >= len(chunks))
        self.caches.restore(chunks)
        s = self.static.fill(chunks, bucket, carried, carried_rows)
        self._graphs[bucket].replay()
        self.caches.save(chunks)
        self.replays += 1
        return self._outputs[bucket][:s].clone()


def start(model: nn.Module, caches: HybridCaches, builder: CudaHybridBuilder, max_batch: int,
          max_blocks: int) -> HybridGraphRunner | None:
    """The captured runner, or None (logged) where a layer is uncovered or a capture fails."""
    uncovered = uncovered_layers(caches, builder)
    if uncovered:
        log.warning("hybrid CUDA graphs off: layers %s run the per-sequence loop", uncovered)
        return None
    started = time.perf_counter()
    try:
        runner = HybridGraphRunner(model, caches, builder, max_batch, max_blocks)
        runner.capture(torch.cuda.graph_pool_handle())
    except Exception as e:  # noqa: BLE001 - any failed capture leaves the eager path
        log.warning("hybrid CUDA graphs off: the capture failed (%s: %s); decode steps stay "
                    "eager", type(e).__name__, e)
        try:
            torch.cuda.synchronize()
        except RuntimeError as sync:  # a capture error the context keeps: the eager step will say
            log.warning("after the failed capture: %s", sync)
        return None
    log.info("captured hybrid CUDA graphs for decode batches %s in %.1f s (%s=0: off)",
             runner.buckets, time.perf_counter() - started, ENV_SWITCH)
    return runner
