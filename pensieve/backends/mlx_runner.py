"""The engine's ``Runner`` on MLX: mlx-lm's model modules over a paged KV pool in MLX arrays.

The engine (scheduler, continuous batching, prefix cache, block accounting, sampling) is the
same as on PyTorch; only the step runs here. A step's chunks are grouped into model calls whose
rows have the same number of new tokens, so no query is ever padded: every one-token chunk
(decodes, and a prompt's last token) goes into one batched call, each longer chunk (a prefill)
into its own. Rows of a call differ in context length: each gathers its own context from the
pool, padded to the longest and masked (``mlx_kv.StepLayout``). Logits come back as a float32
``torch`` tensor through numpy, as the protocol asks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
import torch

from pensieve.backends.mlx_kv import PagedKVPool, PagedLayerCache, StepLayout
from pensieve.engine.config import EngineConfig
from pensieve.engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

MX_DTYPES = {torch.float32: mx.float32, torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}


def plan_blocks(kv_bytes_per_token: int, config: EngineConfig) -> int:
    """Enough blocks for one full context at least; more up to ``kv_cache_bytes`` (the
    configurable memory budget), at most ``max_num_seqs`` full contexts."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_seq = -(-config.context_length // config.block_size)
    by_bytes = config.host_kv_bytes // (kv_bytes_per_token * config.block_size)
    return max(per_seq, min(by_bytes, per_seq * config.max_num_seqs))


def layer_windows(model: Any) -> list[int | None]:
    """Each layer's sliding window from the model's own cache plan (None: full attention);
    ValueError for a model whose layers keep state other than keys and values."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    windows: list[int | None] = []
    for layer, cache in enumerate(make_prompt_cache(model)):
        if type(cache) is KVCache:
            windows.append(None)
        elif type(cache) is RotatingKVCache:
            windows.append(cache.max_size)
        else:
            raise ValueError(
                f"layer {layer} keeps a {type(cache).__name__}, not a key/value cache: this "
                "architecture (recurrent or hybrid layers) is not supported by the MLX backend yet"
            )
    return windows


class _LastRow:
    """An mlx-lm decoder (``Model.model``) whose output keeps only the last position."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self._inner(*args, **kwargs)[:, -1:, :]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class MlxRunner:
    """Runs the engine's steps through an mlx-lm ``Model`` (``model(ids, cache=[...])``)."""

    def __init__(self, model: Any, config: EngineConfig, kv_bytes_per_token: int,
                 vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.windows = layer_windows(model)
        self.device = torch.device("cpu")  # where the logits it returns live
        self.block_size = config.block_size
        self.num_blocks = plan_blocks(kv_bytes_per_token, config)
        dtype = MX_DTYPES[config.kv_dtype] if config.kv_dtype is not None else None
        self.pool = PagedKVPool(len(self.windows), self.num_blocks, config.block_size, dtype)

    def can_carry(self, chunks: list[ScheduledChunk]) -> bool:
        return False  # every step's input ids are read on the host

    def run(self, chunks: list[ScheduledChunk], carried: torch.Tensor | None = None,
            carried_rows: Sequence[int] = ()) -> torch.Tensor:
        """Logits ``[S, vocab]`` (float32, CPU) for the chunks that complete, in their order."""
        if carried is not None and any(r >= 0 for r in carried_rows):
            raise ValueError("the MLX runner takes no carried ids (can_carry is False)")
        bs = self.block_size
        self.pool.ensure(max(b for c in chunks for b in
                             c.request.block_ids[: -(-self._end(c) // bs)]))
        singles = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
        groups = ([singles] if singles else []) + [[i] for i, c in enumerate(chunks)
                                                   if c.num_tokens > 1]
        rows: dict[int, mx.array] = {}
        for group in groups:
            logits = self._call([chunks[i] for i in group])
            for j, i in enumerate(group):
                if chunks[i].completes:
                    rows[i] = logits[j]
        order = [i for i, c in enumerate(chunks) if c.completes]
        out = mx.stack([rows[i] for i in order]).astype(mx.float32) if order else None
        mx.eval(*([out] if out is not None else []), *self.pool.arrays())
        if out is None:
            return torch.empty((0, self.vocab_size))
        return torch.from_numpy(np.array(out, copy=True))

    @staticmethod
    def _end(chunk: ScheduledChunk) -> int:
        return chunk.request.num_computed_tokens + chunk.num_tokens

    def _call(self, chunks: list[ScheduledChunk]) -> mx.array:
        """One model call over chunks of equal length; each row's last position's logits."""
        layout = self._layout(chunks)
        ids = mx.array([c.request.all_ids[c.request.num_computed_tokens: self._end(c)]
                        for c in chunks])
        caches = [PagedLayerCache(self.pool, layer, layout, window)
                  for layer, window in enumerate(self.windows)]
        inner = self.model.get("model") if chunks[0].num_tokens > 1 else None
        if inner is None:  # a decode call, or a model not laid out as Model(model=...): all rows
            return self.model(ids, cache=caches)[:, -1, :]
        # the output layer only on the last row: the inner decoder's output is cut to it
        # before the model's own head (tied or not, soft-capped or not) runs
        self.model["model"] = _LastRow(inner)
        try:
            return self.model(ids, cache=caches)[:, -1, :]
        finally:
            self.model["model"] = inner

    def _layout(self, chunks: list[ScheduledChunk]) -> StepLayout:
        bs = self.block_size
        starts = [c.request.num_computed_tokens for c in chunks]
        ends = [self._end(c) for c in chunks]
        total = max(ends)
        slots: list[int] = []
        index = np.zeros((len(chunks), total), dtype=np.int32)
        for b, chunk in enumerate(chunks):
            blocks = np.asarray(chunk.request.block_ids[: -(-ends[b] // bs)], dtype=np.int32)
            row = (blocks[:, None] * bs + np.arange(bs, dtype=np.int32)[None, :]).reshape(-1)
            index[b, : ends[b]] = row[: ends[b]]
            slots.extend(row[starts[b]: ends[b]].tolist())
        return StepLayout(starts, ends, mx.array(slots, dtype=mx.int32), mx.array(index))
