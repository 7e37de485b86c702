"""The MLX backend's paged KV cache: one pool of MLX arrays per layer behind the engine's block ids.

The engine hands out block ids ``0 .. num_blocks - 1`` (``engine/block_pool.py``); slot
``b * block_size + i`` is token ``i`` of block ``b``, as in the PyTorch runner. A pool holds
``[slots, kv_heads, head_dim]`` keys and values per layer; it grows in whole blocks as higher
block ids are first written (MLX has no uninitialised allocation: a pool created at its full
size would be resident from the start), never past the engine's ``num_blocks``.

mlx-lm's model modules take a cache object per layer and call
``cache.update_and_fetch(keys, values)`` with ``[B, kv_heads, L, head_dim]`` and use the
returned keys/values in attention, ``cache.offset`` for RoPE and ``cache.make_mask`` (through
``create_attention_mask``) for the attention mask. ``PagedLayerCache`` is that object for one
step: it writes the chunk's keys/values into the requests' slots and returns each row's
gathered context, padded to the longest and masked by ``StepLayout.mask``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

GROW_BLOCKS = 64  # the pool grows by at least this many blocks (and at least doubles)


class PagedKVPool:
    """Keys and values of every layer in slots; grows lazily up to ``num_blocks`` blocks."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 dtype: mx.Dtype | None = None) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype  # None: the keys' own dtype (the model's activations)
        self.keys: list[mx.array | None] = [None] * num_layers
        self.values: list[mx.array | None] = [None] * num_layers
        self.capacity = 0  # blocks allocated in every layer's pool

    def ensure(self, max_block: int) -> None:
        """Make block ``max_block`` addressable in every layer (those allocated so far)."""
        if max_block >= self.num_blocks:
            raise ValueError(f"block {max_block} is outside the pool of {self.num_blocks}")
        if max_block < self.capacity:
            return
        self.capacity = min(self.num_blocks, max(max_block + 1, 2 * self.capacity,
                                                 self.capacity + GROW_BLOCKS))
        for layer in range(self.num_layers):
            self.keys[layer] = self._grown(self.keys[layer])
            self.values[layer] = self._grown(self.values[layer])

    def _grown(self, pool: mx.array | None) -> mx.array | None:
        if pool is None:
            return None  # allocated on the layer's first write, when its shape is known
        extra = self.capacity * self.block_size - pool.shape[0]
        return mx.concatenate([pool, mx.zeros((extra, *pool.shape[1:]), pool.dtype)])

    def write(self, layer: int, slots: mx.array, keys: mx.array, values: mx.array) -> None:
        """Store ``[N, kv_heads, head_dim]`` keys/values at ``slots`` (``[N]``)."""
        if self.keys[layer] is None:
            dtype = self.dtype or keys.dtype
            rows = self.capacity * self.block_size
            self.keys[layer] = mx.zeros((rows, *keys.shape[1:]), dtype)
            self.values[layer] = mx.zeros((rows, *values.shape[1:]), dtype)
        k_pool, v_pool = self.keys[layer], self.values[layer]
        k_pool[slots] = keys.astype(k_pool.dtype)
        v_pool[slots] = values.astype(v_pool.dtype)
        self.keys[layer], self.values[layer] = k_pool, v_pool

    def gather(self, layer: int, index: mx.array) -> tuple[mx.array, mx.array]:
        """``[B, T]`` slots → keys and values ``[B, T, kv_heads, head_dim]``."""
        return self.keys[layer][index], self.values[layer][index]

    def arrays(self) -> list[mx.array]:
        """Every allocated pool array (to evaluate with a step's outputs)."""
        return [a for a in (*self.keys, *self.values) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


@dataclass
class StepLayout:
    """Where one model call's rows read and write: ``B`` sequences of ``L`` new tokens each
    (all equal: the runner groups chunks so that no query is padded).

    ``starts[b]`` is row ``b``'s first new position, ``ends[b]`` its context length after the
    call; ``slots`` ``[B·L]`` the slots its new tokens go to; ``index`` ``[B, T]`` the slots of
    its whole context, padded with slot 0 to the longest (``T = max(ends)``).
    """

    starts: list[int]
    ends: list[int]
    slots: mx.array
    index: mx.array
    _masks: dict[int | None, mx.array] = field(default_factory=dict)

    @property
    def offset(self) -> int | mx.array:
        """RoPE offsets: an int when every row starts at the same position, else ``[B]``."""
        if len(set(self.starts)) == 1:
            return self.starts[0]
        return mx.array(self.starts)

    def mask(self, num_queries: int, window: int | None = None) -> mx.array:
        """``[B, 1, L, T]`` bool: query ``j`` of row ``b`` (position ``starts[b] + j``) sees key
        ``t`` when ``t ≤`` its position (and within ``window`` of it); padded keys never."""
        if window not in self._masks:
            total = self.index.shape[1]
            keys = mx.arange(total)[None, None, :]  # [1, 1, T]
            pos = mx.array(self.starts)[:, None, None] + mx.arange(num_queries)[None, :, None]
            allowed = keys <= pos  # [B, L, T]; keys past a row's end are past every query too
            if window is not None:
                allowed = allowed & (keys > pos - window)
            self._masks[window] = allowed[:, None]
        return self._masks[window]


class PagedLayerCache:
    """One layer's cache object for one model call (what mlx-lm's attention modules call)."""

    def __init__(self, pool: PagedKVPool, layer: int, layout: StepLayout,
                 window: int | None = None) -> None:
        self.pool = pool
        self.layer = layer
        self.layout = layout
        self.window = window  # a sliding-window layer's span (mlx-lm's RotatingKVCache max_size)
        self.keys = None  # what some mlx-lm models probe; the pool holds the real keys

    @property
    def offset(self) -> int | mx.array:
        return self.layout.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """``[B, H, L, D]`` new keys/values in; ``[B, H, T, D]`` each row's context out."""
        batch, heads, length, dim = keys.shape
        flat_k = keys.transpose(0, 2, 1, 3).reshape(batch * length, heads, dim)
        flat_v = values.transpose(0, 2, 1, 3).reshape(batch * length, heads, values.shape[-1])
        self.pool.write(self.layer, self.layout.slots, flat_k, flat_v)
        ctx_k, ctx_v = self.pool.gather(self.layer, self.layout.index)
        return (ctx_k.transpose(0, 2, 1, 3).astype(keys.dtype),
                ctx_v.transpose(0, 2, 1, 3).astype(values.dtype))

    def make_mask(self, num_queries: int, return_array: bool = False,
                  window_size: int | None = None, **_: object) -> mx.array:
        return self.layout.mask(num_queries, window_size or self.window)

    @property
    def state(self) -> tuple[()]:
        return ()

    def is_trimmable(self) -> bool:
        return False
