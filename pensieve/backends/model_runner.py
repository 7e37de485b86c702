"""Owns the tensors: the KV cache, the batch's input tensors, the model call.

On CPU each step runs the model eagerly; with the compiled kernels (``backends/cpu_quant``)
RMSNorm and attention run on them (``cpu_quant/layers.py``), and a decode-only step of a q4
model runs all its layers in one call (``cpu_quant/decoder.py``); else the per-sequence SDPA
loop. On CUDA the
batch is built with batched attention metadata (``cuda_batch.py``), and decode-only steps
replay CUDA graphs (``cuda_graph_runner.py``); the caches then hold one extra scratch block,
past the ones the block pool hands out, where the graphs' padding rows write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import nn

from pensieve.backends import cuda_allocator, step_profile
from pensieve.backends.hybrid_cache import GroupedAttention, HybridCaches, plan_cache
from pensieve.engine.config import EngineConfig
from pensieve.engine.kv_plan import CachePlan, uniform_full
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.models.args import ModelArgs
from pensieve.models.cache_spec import LayerCache, PagedKV, attention_layout
from pensieve.models.family import FastPaths
from pensieve.models.forward_context import AttentionBackend, ForwardContext, SequenceSlice

log = logging.getLogger(__name__)
_CUDA_HEADROOM = 4 << 30  # bytes left free for activations and graphs when sizing the cache


# A CPU step of at most ROWS_AS_DECODE tokens whose rows attend to at most ROW_KEYS keys in all
# runs on the one-call C decoder with each new token as a row (its own context length: causal
# by construction; every row's K/V is stored before any row attends). A short prompt or a
# follow-up's few new tokens then skip ~30 layers of PyTorch module calls (an 8-token chunk:
# 33 → 22-26 ms served). The per-row attention reads every key once a row, so past ~8k
# row-keys SDPA wins (in-process: 40 new over 256 cached 86 vs 101 ms; 16 over 1000 118 vs 81).
ROWS_AS_DECODE = 64
ROW_KEYS = 8192
# A CPU step of at least this many tokens that completes every chunk it ran (a prefill done)
# hands the kernels' chunk-sized scratch back (``CpuAttention.release_scratch``): re-faulting
# it costs ~20 ms at the next prefill, keeping it ~64 MB of RSS for good (1.5B, 512 rows).
RELEASE_FROM = 64


def row_keys(sequences: Sequence[SequenceSlice]) -> int:
    """Keys read when every new token attends as its own row: Σ over rows of context length."""
    return sum(s.query_len * (s.context_len - s.query_len) + s.query_len * (s.query_len + 1) // 2
               for s in sequences)


def as_rows(sequences: Sequence[SequenceSlice]) -> list[SequenceSlice]:
    """Each new token of each sequence as a one-token sequence attending up to itself."""
    return [SequenceSlice(s.query_start + j, 1, s.context_len - s.query_len + j + 1, s.block_table)
            for s in sequences for j in range(s.query_len)]


def kv_block_bytes(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


def kv_budget(config: EngineConfig) -> int:
    """Bytes the KV cache (and recurrent states) may take: ``kv_cache_bytes`` (the host's
    default where unset); on CUDA what ``gpu_memory_fraction`` of the card leaves once everything
    already on it (the weights, other programs) and a headroom for activations and graphs are
    counted, capped by ``kv_cache_bytes`` where set (``--kv-cache-gb``)."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return config.host_kv_bytes
    room = max(0, cuda_kv_limit(device, config.gpu_memory_fraction))
    return room if config.kv_cache_bytes is None else min(room, config.kv_cache_bytes)


def cuda_kv_limit(device: torch.device, fraction: float) -> int:
    """``fraction`` of the card's memory less what is in use on it now (this process's cached
    but unused blocks handed back first) and ``_CUDA_HEADROOM``."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(fraction * total) - (total - free) - _CUDA_HEADROOM


def log_gpu_memory(device: torch.device, model: nn.Module, kv: int, blocks: int,
                   block_size: int, fraction: float) -> None:
    """The start log's line on what this process holds on the GPU: the weights as the model
    holds them (``weight_bytes.held_bytes``), the rest allocated besides the KV cache."""
    from pensieve.backends.weight_bytes import held_bytes

    _, total = torch.cuda.mem_get_info(device)
    weights = held_bytes(model)
    other = torch.cuda.memory_allocated(device) - kv - weights
    log.info("GPU memory: weights %.2f GiB (+ %.2f GiB other), KV cache %.2f GiB (%d blocks of "
             "%d tokens); limit %.0f%% of %.1f GiB (--gpu-memory-fraction)", weights / 2**30,
             other / 2**30, kv / 2**30, blocks, block_size, 100 * fraction, total / 2**30)


def log_gpu_memory_use(device: torch.device, when: str) -> None:
    """What the process holds on the GPU beyond the start's plan: torch's allocated and
    reserved bytes (the allocator's cache, CUDA-graph pools included) against the card's use."""
    free, total = torch.cuda.mem_get_info(device)
    log.info("GPU memory %s: torch allocated %.2f GiB (peak %.2f), reserved %.2f GiB; the card "
             "%.2f of %.1f GiB used; allocator %s", when,
             torch.cuda.memory_allocated(device) / 2**30,
             torch.cuda.max_memory_allocated(device) / 2**30,
             torch.cuda.memory_reserved(device) / 2**30, (total - free) / 2**30, total / 2**30,
             cuda_allocator.describe())
    log.info("GPU memory %s by pool: %s", when, cuda_allocator.describe_pools(device))


def plan_num_blocks(args: ModelArgs, config: EngineConfig) -> int:
    """Enough blocks for one full context at least; more up to the memory cap (``kv_budget``)."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_seq = -(-config.context_length // config.block_size)
    budget = kv_budget(config)
    by_bytes = budget // kv_block_bytes(args, config.block_size, config.kv_dtype or config.dtype)
    return max(per_seq, min(by_bytes, per_seq * config.max_num_seqs))


def model_layout(model: nn.Module, args: ModelArgs) -> tuple[LayerCache, ...]:
    """What each layer caches: the model's own ``cache_layout`` where it has one (a test model),
    else its family's (``Family.cache_layout``), else paged K/V everywhere."""
    layout = getattr(model, "cache_layout", None)
    if layout is not None:
        return tuple(layout)
    from pensieve.models.registry import UnsupportedArchitectureError, family

    try:
        return tuple(family(args.architecture).cache_layout(args))
    except UnsupportedArchitectureError:
        return attention_layout(args)


class ModelRunner:
    def __init__(self, model: nn.Module, args: ModelArgs, config: EngineConfig,
                 cuda_graphs: bool = True) -> None:
        self.model = model
        # what the model declared it may take (models/<family>.py); nothing when it declared none
        self.fast: FastPaths = getattr(model, "fast_paths", FastPaths())
        windows = [w for w in map(args.window, range(args.num_layers)) if w is not None]
        self.min_window = min(windows) if windows else None
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.cache_plan: CachePlan | None = None  # read by the engine's KV manager
        self.hybrid: HybridCaches | None = None
        self.cuda_batches = self.graphs = self.chunk_graphs = None
        self.cpu_attention = self.cpu_decoder = None
        self._scratch_held = False  # a prefill-sized CPU step grew the kernels' scratch
        self.cuda_hybrid = None  # backends/cuda_hybrid.CudaHybridBuilder for hybrid layouts
        self.hybrid_graphs = None  # backends/cuda_hybrid_graphs.HybridGraphRunner
        self.profiler = step_profile.from_env(self.device)  # PENSIEVE_PROFILE_STEPS, else None
        if self.device.type == "cuda":
            from pensieve.backends import cuda_router

            if cuda_router.enabled():  # MoE routers' selection in one launch (before any capture)
                cuda_router.install(self.model)
        layout = model_layout(model, args)
        if not uniform_full(layout, config.context_length):
            self._init_hybrid(layout, config, args, cuda_graphs)
            return
        self.num_blocks = plan_num_blocks(args, config)
        on_cuda = self.device.type == "cuda"
        scratch = 1 if on_cuda else 0  # a block past the pool's, for graph padding rows
        shape = (self.num_blocks + scratch, config.block_size, args.num_kv_heads, args.head_dim)
        # empty, not zeros: a slot is always written before it is read, and untouched pages
        # of a CPU cache then cost no resident memory
        self.k_caches = [
            torch.empty(shape, dtype=config.kv_dtype or config.dtype, device=self.device)
            for _ in range(args.num_layers)
        ]
        self.v_caches = [torch.empty_like(k) for k in self.k_caches]
        if on_cuda:
            kv = sum(c.nbytes for c in self.k_caches + self.v_caches)
            log_gpu_memory(self.device, self.model, kv, self.num_blocks, config.block_size,
                           config.gpu_memory_fraction)
            self._init_cuda(args, config, cuda_graphs and self.fast.cuda_graphs)
        elif self.device.type == "cpu":
            self._init_cpu(config)

    def _init_hybrid(self, layout: Sequence[LayerCache], config: EngineConfig,
                     args: ModelArgs, cuda_graphs: bool = True) -> None:
        """Per-layer caches, layer groups, recurrent state (``backends/hybrid_cache.py``): none
        of the fast paths the family declared (they assume one uniform full-attention cache)
        but the latent kernel; on CUDA the attention layers on the batched kernels per group
        (``cuda_hybrid.py``), latent layers on ``cuda_mla.py``'s where the model declared it;
        decode steps as CUDA graphs (``cuda_hybrid_graphs.py``; ``PENSIEVE_HYBRID_GRAPHS=0``: off)."""
        # the fused layers (``cuda_layers``: MLA blocks' add + norm) were switched at build and
        # assume no cache layout: kept, so the log below names only what stays off
        kept = FastPaths(cuda_latent_attention=self.fast.cuda_latent_attention,
                         cuda_fused_layers=self.fast.cuda_fused_layers)
        if self.fast != kept:
            log.info("the cache layout is not uniform full attention: fast paths %s stay off",
                     self.fast)
        self.fast = kept
        self.cache_plan = plan_cache(layout, config, kv_budget(config))
        self.hybrid = HybridCaches(layout, self.cache_plan, config, self.device)
        self.num_blocks = self.cache_plan.paged[0].num_blocks
        self.k_caches, self.v_caches = self.hybrid.k_caches, self.hybrid.v_caches
        if self.device.type == "cuda":
            from pensieve.backends import cuda_hybrid, cuda_mla

            if cuda_hybrid.enabled():  # the batched kernels per layer group
                latent = self.fast.cuda_latent_attention and cuda_mla.enabled()
                self.cuda_hybrid = cuda_hybrid.CudaHybridBuilder(
                    self.k_caches, self.v_caches, self.hybrid.layer_group,
                    [g.window for g in self.cache_plan.paged], config.block_size, self.device,
                    latent_heads=args.num_heads if latent else None)
                log.info("hybrid layout on the CUDA kernels for layers %s, the latent kernel for "
                         "layers %s, the per-sequence loop for the rest (%s=0: every layer)",
                         sorted(self.cuda_hybrid.kernels), sorted(self.cuda_hybrid.latent),
                         cuda_hybrid.ENV_SWITCH)
            from pensieve.backends import (
                cuda_gdn, cuda_hybrid_graphs, cuda_offset_norm,
            )

            if cuda_gdn.enabled():  # Gated DeltaNet steps on the fused kernels
                cuda_gdn.install(self.model)
            if cuda_offset_norm.enabled():  # Qwen3.5/Next's (1 + w) RMSNorms: one launch each
                cuda_offset_norm.install(self.model)
            from pensieve.backends import cuda_hybrid_mla_rope

            if cuda_hybrid_mla_rope.enabled():  # MLA: latent norm + RoPEs + cache write, one
                cuda_hybrid_mla_rope.install(self.model)
            if self.cuda_hybrid is not None and cuda_graphs and cuda_hybrid_graphs.enabled():
                self.hybrid_graphs = cuda_hybrid_graphs.start(
                    self.model, self.hybrid, self.cuda_hybrid, config.max_num_seqs,
                    -(-config.context_length // config.block_size))
        if self.device.type == "cpu" and config.dtype == torch.float32:
            from pensieve.backends.cpu_quant import load_kernels
            from pensieve.backends.cpu_quant.layers import CpuAttention, swap_norms

            kernels = load_kernels()  # the compiled RMSNorm: the same op, whatever the cache
            if kernels is not None:
                swap_norms(self.model, kernels)
            # the compiled attention while no window masks yet (as for one table): only where
            # every layer is plain K/V of one shape
            plain = all(isinstance(s, PagedKV) and not s.latent for s in layout) and len(
                {(s.kv_heads, s.head_dim, s.v_head_dim) for s in layout if isinstance(s, PagedKV)}) == 1
            if kernels is not None and plain and CpuAttention.fits(self.k_caches, config.dtype):
                self.cpu_attention = CpuAttention(kernels)

    def _hybrid_attention(self, layer_group: Sequence[int | None],
                          sequences: list[list[SequenceSlice]], slots: list[torch.Tensor]
                          ) -> AttentionBackend | None:
        """On CUDA the batched kernels per group (``cuda_hybrid.py``); on the CPU the compiled
        attention, one step per group, where no sequence has reached the shortest window (no
        window masks, no block was given back)."""
        if self.cuda_hybrid is not None:
            return self.cuda_hybrid.build(layer_group, sequences, slots)
        if self.cpu_attention is None or self.min_window is None or any(
                s.context_len > self.min_window for s in sequences[0]):
            return None
        steps: list[AttentionBackend] = [self.cpu_attention.step(seqs) for seqs in sequences]
        return steps[0] if len(steps) == 1 else GroupedAttention(layer_group, steps, slots, sequences)

    def _init_cpu(self, config: EngineConfig) -> None:
        """RMSNorm and attention on the compiled CPU kernels where they build and fit."""
        from pensieve.backends.cpu_quant import load_kernels, moe_decoder
        from pensieve.backends.cpu_quant.decoder import CpuDecoder
        from pensieve.backends.cpu_quant.layers import CpuAttention, swap_norms

        kernels = load_kernels()
        if kernels is None or not CpuAttention.fits(self.k_caches, config.dtype):
            return
        self.cpu_attention = CpuAttention(kernels)
        swap_norms(self.model, kernels)
        moe = self.fast.cpu_moe_decoder and moe_decoder.enabled()
        if (self.fast.cpu_decoder or moe) and CpuDecoder.fits(self.model, moe=moe):
            self.cpu_decoder = CpuDecoder(kernels, self.model, self.k_caches, self.v_caches)

    def _init_cuda(self, args: ModelArgs, config: EngineConfig, cuda_graphs: bool) -> None:
        from pensieve.backends.cuda_batch import CudaBatchBuilder
        from pensieve.backends.cuda_chunk_graphs import CudaChunkGraphs
        from pensieve.backends.cuda_graph_runner import PREFILL_ROWS, CudaGraphRunner

        if not self.fast.paged_kernels:
            return  # the per-sequence path (windows masking within the context)
        self.cuda_batches = CudaBatchBuilder(config.block_size, args.num_kv_heads, self.device)
        if not cuda_graphs:
            return
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.graphs = CudaGraphRunner(
            self.model, self.k_caches, self.v_caches, max_batch=config.max_num_seqs,
            max_blocks=-(-config.context_length // config.block_size),
            scratch_block=self.num_blocks,
            prefill_rows=min(PREFILL_ROWS, config.max_num_batched_tokens),
        )
        self.graphs.capture(pool)
        self.chunk_graphs = CudaChunkGraphs(
            self.model, self.k_caches, self.v_caches, max_context=config.context_length,
            scratch_block=self.num_blocks, max_tokens=min(64, config.max_num_batched_tokens),
        )
        self.chunk_graphs.capture(pool)
        log.info("captured CUDA graphs for decode batches %s and prefill chunks %s in %.1f s",
                 self.graphs.buckets, self.chunk_graphs.buckets if self.chunk_graphs else [],
                 time.perf_counter() - started)

    def can_carry(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether ``run`` can take these chunks' input tokens from a device tensor (a decode
        step as a CUDA graph, or any CPU step): what async scheduling needs."""
        if self.graphs is not None:
            return self.graphs.can_run(chunks)
        if self.hybrid_graphs is not None:
            return self.hybrid_graphs.can_run(chunks)
        # the per-sequence path fills carried ids itself; hybrid layouts run synchronously
        return self.cuda_batches is None and self.hybrid is None

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None = None,
            carried_rows: Sequence[int] = ()) -> torch.Tensor:
        """Run one step; logits [S, V] for the chunks that complete, in their order.

        With ``carried`` (the previous step's sampled ids, still on the device), chunk ``i``
        whose ``carried_rows[i] >= 0`` is a one-token decode of ``carried[carried_rows[i]]``,
        a token the host has not read yet (only where ``can_carry``).
        """
        if self.profiler is not None:
            return self.profiler.step(chunks, lambda: self._run(chunks, carried, carried_rows))
        return self._run(chunks, carried, carried_rows)

    def _run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None,
             carried_rows: Sequence[int]) -> torch.Tensor:
        if self.hybrid is not None:
            if self.hybrid_graphs is not None and self.hybrid_graphs.can_run(chunks):
                return self.hybrid_graphs.run(chunks, carried, carried_rows)
            return self.hybrid.run(self.model, chunks, self._hybrid_attention)
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, carried, carried_rows)
        if self.chunk_graphs is not None and self.chunk_graphs.can_run(chunks):
            return self.chunk_graphs.run(chunks)
        if self.cuda_batches is not None:
            batch = self.cuda_batches.build(chunks)
            ctx = ForwardContext(
                k_caches=self.k_caches, v_caches=self.v_caches,
                slot_mapping=batch.slot_mapping, sequences=[],
                logits_indices=batch.logits_indices, attention=batch.attention,
            )
            return self.model(batch.input_ids, batch.positions, ctx)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sequences: list[SequenceSlice] = []
        rows: list[int] = []
        fill_at: list[int] = []  # rows of ids that take a carried token
        fill_from: list[int] = []
        bs = self.block_size
        for i, chunk in enumerate(chunks):
            req, start = chunk.request, chunk.request.num_computed_tokens
            end = start + chunk.num_tokens
            q_start = len(ids)
            if carried is not None and carried_rows[i] >= 0:
                fill_at.append(len(ids))
                fill_from.append(carried_rows[i])
                ids.append(0)
            else:
                ids.extend(req.all_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(req.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            table = torch.tensor(req.block_ids[: -(-end // bs)], device=self.device)
            sequences.append(SequenceSlice(q_start, chunk.num_tokens, end, table))
            if chunk.completes:
                rows.append(len(ids) - 1)
        input_ids = self._tensor(ids)
        if fill_at:
            input_ids[self._tensor(fill_at)] = carried[self._tensor(fill_from)]
        step = self.cpu_attention.step(sequences) if self._kernels_attend(sequences) else None
        logits = self._run_cpu(input_ids, positions, slots, sequences, rows, step)
        if self._scratch_held and len(rows) == len(chunks):  # every prompt in the step done
            self.cpu_attention.release_scratch()
            self._scratch_held = False
        return logits

    def _run_cpu(self, input_ids: torch.Tensor, positions: list[int], slots: list[int],
                 sequences: list[SequenceSlice], rows: list[int],
                 step: AttentionBackend | None) -> torch.Tensor:
        bs, n = self.block_size, input_ids.shape[0]
        if self.cpu_decoder and len(rows) == n and self.cpu_decoder.can_run(n, step):
            return self.cpu_decoder(input_ids, self._tensor(positions),
                                    self._tensor(slots), step, bs)
        if self.cpu_decoder and n <= ROWS_AS_DECODE and row_keys(sequences) <= ROW_KEYS:
            row_step = self.cpu_attention.step(as_rows(sequences))
            if self.cpu_decoder.can_run(n, row_step):
                return self.cpu_decoder(input_ids, self._tensor(positions), self._tensor(slots),
                                        row_step, bs, logits_rows=self._tensor(rows))
        ctx = ForwardContext(
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            slot_mapping=self._tensor(slots),
            sequences=sequences,
            logits_indices=self._tensor(rows),
            attention=step,
        )
        # a prefill chunk: the kernels' per-call buffers grow to its size, handed back (run)
        # once every prompt of a step is done
        self._scratch_held |= step is not None and n >= RELEASE_FROM
        return self.model(input_ids, self._tensor(positions), ctx)

    def _kernels_attend(self, sequences: list[SequenceSlice]) -> bool:
        """Whether the compiled attention may serve this step: the model declared it, or no
        sequence has reached its shortest window yet (so no window masks)."""
        if self.cpu_attention is None:
            return False
        return self.fast.paged_kernels or (
            self.min_window is not None and all(s.context_len <= self.min_window for s in sequences))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
