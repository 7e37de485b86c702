"""Build the PyTorch engine for a checkpoint: model class, weights, dtype, device."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pensieve.engine.config import EngineConfig
from pensieve.engine.engine import Engine
from pensieve.loaders.checkpoint import Checkpoint
from pensieve.models.registry import model_class

log = logging.getLogger(__name__)


def build_model(checkpoint: Checkpoint, config: EngineConfig) -> nn.Module:
    """Instantiate the architecture and load the checkpoint's weights, strictly."""
    args = checkpoint.args
    with torch.device("meta"):
        model = model_class(args)(args, max_positions=config.context_length)
    weights = dict(checkpoint.weights)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    model.load_state_dict(weights, strict=not args.tie_word_embeddings, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.materialize("cpu")  # its tables were made on meta too
    return model.to(device=config.device, dtype=config.dtype).eval()


def build_engine(checkpoint: Checkpoint, config: EngineConfig) -> Engine:
    model = build_model(checkpoint, config)
    return Engine(model, checkpoint.args, checkpoint.tokenizer, config)
