"""Engine settings, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

import torch


HOST_KV_CACHE_BYTES = 1 << 30  # the CPU / MLX KV cache's default size


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kv_dtype: torch.dtype | None = None  # the KV cache's element type; None → dtype
    context_length: int = 8192  # max prompt + output tokens of one request
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None → enough for max_num_seqs full contexts, capped
    # the KV cache's bytes when num_kv_blocks is None: None → HOST_KV_CACHE_BYTES on the CPU
    # (and MLX), on CUDA what gpu_memory_fraction leaves; a set value caps CUDA's too
    kv_cache_bytes: int | None = None
    gpu_memory_fraction: float = 0.9  # CUDA: this process's weights + KV cache + headroom ≤ this
    keep_dense_weights: bool = False  # CUDA int4: also keep tinygemm + dense bf16 copies
    max_num_seqs: int = 8  # requests decoding in one step
    max_num_batched_tokens: int = 512  # token budget of one step (prefill is chunked to fit)
    enable_prefix_cache: bool = True
    int8_lm_head: bool = False  # weight-only int8 output projection (CPU decode speed)
    max_waiting: int = 64  # queued requests before new ones get "overloaded" (529)
    grammar_workers: int = 2  # threads compiling grammars (never the engine's)
    grammar_timeout_s: float = 5.0  # a compile still running after this degrades its request
    aging_steps: int = 128  # a request waiting this many steps goes before newer arrivals
    async_scheduling: bool | None = None  # launch a decode step before the last one's ids are read; None → on CUDA
    seed: int = 0
    # hybrid models (engine/kv_groups.py): tokens between recurrent-state checkpoints (and
    # between the windows a sliding-window layer keeps for prefix hits), a multiple of
    # block_size; how many checkpoints (None → as many as fit a quarter of the KV budget, ≤ 256)
    state_checkpoint_interval: int = 512
    state_checkpoints: int | None = None

    @property
    def host_kv_bytes(self) -> int:
        """The KV cache's bytes where memory is the host's: the set size or the default."""
        return HOST_KV_CACHE_BYTES if self.kv_cache_bytes is None else self.kv_cache_bytes

    @property
    def overlap_steps(self) -> bool:
        """Whether async scheduling is on (by default where the device runs apart from the host)."""
        if self.async_scheduling is None:
            return torch.device(self.device).type == "cuda"
        return self.async_scheduling

    def __post_init__(self) -> None:
        for name in ("context_length", "block_size", "max_num_seqs", "max_num_batched_tokens",
                     "grammar_workers", "aging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.state_checkpoint_interval < 0 or self.state_checkpoint_interval % self.block_size:
            raise ValueError(f"state_checkpoint_interval must be a multiple of block_size "
                             f"({self.block_size}), got {self.state_checkpoint_interval}")
        if self.state_checkpoints is not None and self.state_checkpoints < 0:
            raise ValueError(f"state_checkpoints must be ≥ 0, got {self.state_checkpoints}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction:g}")
        if self.max_waiting < 0 or self.grammar_timeout_s <= 0:
            raise ValueError(f"max_waiting must be ≥ 0 and grammar_timeout_s positive, got "
                             f"{self.max_waiting} and {self.grammar_timeout_s:g}")
