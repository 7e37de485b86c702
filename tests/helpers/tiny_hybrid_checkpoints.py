"""Tiny random checkpoints of the hybrid families (issue 15), saved as HF folders and loaded
the way the server loads them: one factory per family, for tests that run the real engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pensieve.loaders.registry import load_checkpoint


def qwen(name: str) -> Callable[[Path], Any]:
    """Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``) or Qwen3-Next: Gated DeltaNet + gated attention."""
    def make(tmp: Path) -> Any:
        from tests.helpers.tiny_hybrid import hybrid_config, hybrid_model, save_hybrid_hf

        return load_checkpoint(save_hybrid_hf(tmp / f"{name}-hf", hybrid_model(
            hybrid_config(name, max_position_embeddings=4096))))
    return make


def gpt_oss(tmp: Path, window: int = 8) -> Any:
    """gpt-oss: sliding-window and full layers with sinks, MoE."""
    from tests.helpers.tiny_families import hf_model, save_hf
    from tests.helpers.tiny_gpt_oss import config

    torch.manual_seed(0)
    return load_checkpoint(save_hf(tmp / "gpt-oss-hf", hf_model(config(
        sliding_window=window, max_position_embeddings=4096))))


def glm_lite(tmp: Path, **overrides: Any) -> Any:
    """GLM-4.7-Flash's shape (``glm4_moe_lite``): latent attention + MoE; ``overrides``: config
    fields to change (``bench/follow_up_scaling.py``'s wider layer)."""
    import transformers

    from tests.helpers.tiny_families import VOCAB, save_hf
    from tests.helpers.tiny_moe import moe_model

    torch.manual_seed(0)
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True,
        tie_word_embeddings=False, q_lora_rank=24, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    fields.update(overrides)
    return load_checkpoint(save_hf(tmp / "glm-lite-hf",
                                   moe_model(transformers.Glm4MoeLiteConfig(**fields))))


FAMILIES: dict[str, Callable[[Path], Any]] = {
    "qwen3_5_moe": qwen("qwen3_5_moe"), "qwen3_next": qwen("qwen3_next"),
    "gpt_oss": gpt_oss, "glm4_moe_lite": glm_lite,
}
