"""Model hyper-parameters, independent of the checkpoint format they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelArgs:
    """Everything a model file needs to build its modules.

    Loaders (GGUF metadata, HF ``config.json``) fill this; models never read files.
    ``rope_scaling`` keeps the HF ``config.json`` shape (``{"rope_type": "llama3", ...}``)
    so both loaders feed one RoPE implementation.
    """

    architecture: str  # registry key, e.g. "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_out_bias: bool | None = None  # o_proj's bias; None: as attention_bias (Qwen2: False)
    # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    qk_norm: bool = False
    # tokens a windowed layer's query sees, itself included (Mistral v0.1, Phi-3, Gemma 3);
    # which layers are windowed: ``layer_types`` ("sliding_attention" / "full_attention"),
    # every layer when ``layer_types`` is None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    # windowed layers' own RoPE (Gemma 3: base 10k locally, 1M with scaling globally)
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    partial_rotary_factor: float = 1.0  # RoPE on the first fraction of each head's dims
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim)
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_pytorch_tanh"
    extra: dict[str, Any] = field(default_factory=dict)

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def windows_bind(self, context_length: int) -> bool:
        """Whether some layer's window is shorter than a context: only then does it mask."""
        return any(w is not None and w < context_length
                   for w in map(self.window, range(self.num_layers)))
