"""What every loader returns: arguments, weights in HF names, tokenizer and template."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.args import ModelArgs
from pensieve.models.quant_linear import Int4Groups


class CheckpointError(ValueError):
    """A model file or folder that cannot be loaded (unsupported, truncated, malformed)."""


@dataclass
class Checkpoint:
    """A loaded model source.

    ``weights`` use Hugging Face Llama names (``model.embed_tokens.weight``,
    ``model.layers.{i}.self_attn.q_proj.weight``, ``model.norm.weight``,
    ``lm_head.weight`` unless tied) and are already dequantised to ``dtype``; Q/K
    projections are in HF (rotate-half) row order whatever the source.
    """

    name: str  # served model id, e.g. "SmolLM2-135M-Instruct"
    path: Path
    args: ModelArgs
    weights: dict[str, torch.Tensor]
    tokenizer: TextTokenizer
    chat_template: str | None
    context_length: int
    # linear weights kept as exact 4-bit codes (only when the loader was asked to); such a
    # name is in ``int4`` instead of ``weights``
    int4: dict[str, Int4Groups] = field(default_factory=dict)
    # Q8_0 embedding/output matrices kept as (int8 codes [N, K], float16 scales [N, K/32])
    # under the same request; such a name is in ``int8`` instead of ``weights``
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
