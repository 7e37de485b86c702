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
    extra: dict[str, Any] = field(default_factory=dict)
