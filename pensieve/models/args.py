"""Model hyper-parameters, independent of the checkpoint format they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MoEArgs:
    """A mixture-of-experts MLP: a router picks ``top_k`` of ``num_experts`` SiLU-gated experts
    (each ``expert_size`` wide) per token, capacity-free (every pick runs).

    ``gating``: "softmax" (probabilities over all experts, top-k, optionally renormalised:
    Qwen, Mixtral) or "sigmoid" (GLM-4.5 / DeepSeek-V3: per-expert sigmoid scores, chosen by
    score + ``correction_bias``, within the ``topk_group`` best of ``n_group`` groups).
    ``scale`` multiplies the routed weights (``routed_scaling_factor``). ``shared_size``: a
    shared expert every token runs (0: none), gated by a sigmoid of one learned row where
    ``shared_gate`` (Qwen2-MoE). ``dense_layers``: layers with a plain MLP of
    ``ModelArgs.intermediate_size`` instead.
    """

    num_experts: int
    top_k: int
    expert_size: int
    gating: str = "softmax"
    norm_topk: bool = False
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False
    shared_size: int = 0
    shared_gate: bool = False
    dense_layers: frozenset[int] = frozenset()


@dataclass(frozen=True)
class MLAArgs:
    """Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash): q through a low-rank
    ``q_lora_rank`` path (None: one ``q_proj``); keys and values compressed to one
    ``kv_lora_rank`` latent a token plus a shared ``qk_rope_head_dim`` rotary key, expanded per
    head by ``kv_b_proj`` into ``qk_nope_head_dim`` key and ``v_head_dim`` value dims.
    ``rope_interleave``: the rotary dims rotate as adjacent pairs (llama.cpp's ``deepseek2``
    files always do); ``softmax_scale`` includes YaRN's ``mscale_all_dim`` correction.
    ``split_kv_b``: the checkpoint holds ``kv_b_proj`` as llama.cpp's ``attn_k_b``/``attn_v_b``."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    softmax_scale: float
    rope_interleave: bool = True
    split_kv_b: bool = False


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
    moe: MoEArgs | None = None  # mixture-of-experts MLPs (models/moe.py)
    # latent attention (models/deepseek_mla.py); then the cache's one "KV head" is the latent:
    # num_kv_heads 1, head_dim kv_lora_rank + qk_rope_head_dim
    mla: MLAArgs | None = None
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
