"""What each layer of a model keeps between steps: the contract between a family and the engine.

A family declares one ``LayerCache`` per layer (``Family.cache_layout``); the engine's KV manager
keeps one policy per kind (full attention, sliding window, latent, recurrent state) behind one
interface to the scheduler, and the runner allocates each layer's tensors from the same
declaration. A model reads and writes them only through ``ForwardContext``:

- ``PagedKV`` layers: ``ctx.k_caches[layer]`` ``[blocks, block_size, kv_heads, head_dim]`` and
  ``ctx.v_caches[layer]`` ``[blocks, block_size, kv_heads, v_head_dim]`` — for a latent layer
  (``v_head_dim == 0``) K holds the compressed latent and V is an empty placeholder. Layers
  of different policies (full, each window) keep their own block tables: a layer reads its slot
  mapping and sequences (block tables) through ``ctx.paged(layer)``, never
  ``ctx.slot_mapping``/``ctx.sequences`` directly (``engine/kv_groups.py``, docs/hybrid_cache.md);
- ``RecurrentState`` layers: ``ctx.states.conv[layer]`` ``[slots, *conv_shape]`` and
  ``ctx.states.ssm[layer]`` ``[slots, *state_shape]`` (float32), with ``ctx.states.slots[i]`` the
  slot of ``ctx.sequences[i]``. A slot's state is the state after the sequence's cached tokens
  whenever ``context_len > query_len`` (the runner restored it from a checkpoint where needed);
  a sequence with nothing cached starts from zeros. The layer leaves the state after the step's
  tokens in the slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from pensieve.models.args import ModelArgs


@dataclass(frozen=True)
class PagedKV:
    """Per-token keys and values in the engine's paged blocks.

    ``window``: keys a query sees, itself included (a sliding-window layer); None: every key.
    ``v_head_dim == 0``: latent attention — one compressed vector a token (``kv_heads`` 1,
    ``head_dim`` = latent rank + rotary dims), no separate values.
    """

    kv_heads: int
    head_dim: int
    v_head_dim: int
    window: int | None = None

    @property
    def latent(self) -> bool:
        return self.v_head_dim == 0

    def token_elements(self) -> int:
        """Cache elements one token takes in this layer."""
        return self.kv_heads * (self.head_dim + self.v_head_dim)


@dataclass(frozen=True)
class RecurrentState:
    """A fixed-size per-request state updated every step (Gated DeltaNet, Mamba): ``conv_shape``
    the short convolution's rolling inputs, ``state_shape`` the recurrent matrix (float32)."""

    conv_shape: tuple[int, ...]
    state_shape: tuple[int, ...]

    def elements(self) -> tuple[int, int]:
        conv = state = 1
        for n in self.conv_shape:
            conv *= n
        for n in self.state_shape:
            state *= n
        return conv, state


LayerCache = PagedKV | RecurrentState


def attention_layout(args: ModelArgs) -> tuple[LayerCache, ...]:
    """Every layer attends with its own K/V (windowed where ``args.window`` says): what every
    family declared before hybrid models."""
    return tuple(PagedKV(args.num_kv_heads, args.head_dim, args.head_dim, args.window(i))
                 for i in range(args.num_layers))
