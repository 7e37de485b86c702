"""Build the PyTorch engine for a checkpoint: model class, weights, dtype, device."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pensieve.engine.config import EngineConfig
from pensieve.engine.engine import Engine
from pensieve.backends.model_runner import ModelRunner
from pensieve.loaders.checkpoint import Checkpoint
from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.args import ModelArgs
from pensieve.backends.cuda_int4 import prepare_for_cuda
from pensieve.backends.cuda_layers import fuse_cuda_layers
from pensieve.backends.quantize import (
    int8_lm_head, plan_int4, plan_q8, plan_tables, swap_in, swap_in_tables,
)
from pensieve.models.packing import pack_weights
from pensieve.models.registry import model_class

log = logging.getLogger(__name__)


def build_model(checkpoint: Checkpoint, config: EngineConfig) -> nn.Module:
    """Instantiate the architecture and load the checkpoint's weights, strictly."""
    args = checkpoint.args
    with torch.device("meta"):
        model = model_class(args)(args, max_positions=config.context_length)
    packed = getattr(model, "PACKED", {})
    on_cuda = torch.device(config.device).type == "cuda"
    int4 = dict(checkpoint.int4)
    table_codes, table_floats = plan_tables(int4, args.tie_word_embeddings,
                                            config.int8_lm_head and not on_cuda)
    int4_modules, int4_floats = plan_int4(int4, packed)
    head_q8, q8_floats = plan_q8(checkpoint.int8, args.tie_word_embeddings,
                                 config.int8_lm_head and not on_cuda)
    weights = pack_weights({**checkpoint.weights, **int4_floats, **q8_floats, **table_floats},
                           packed)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    swapped = {f"{path}.weight" for path in int4_modules}
    if args.tie_word_embeddings:
        swapped.add("lm_head.weight")
    if head_q8 is not None:  # the int8 output layer and embedding are built from its codes
        swapped.add("model.embed_tokens.weight")
    swapped |= set(table_codes)
    missing = [k for k in missing if k not in swapped]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit {args.architecture}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if args.tie_word_embeddings and not table_codes:
        model.lm_head.weight = model.model.embed_tokens.weight
    swap_in_tables(model, table_codes, args.tie_word_embeddings)
    swap_in(model, int4_modules, kernel="cuda_int4" if on_cuda else "auto")
    if config.int8_lm_head:
        int8_lm_head(model, q8=head_q8)
    model = model.to(device=config.device, dtype=config.dtype).eval()
    if on_cuda and model.fast_paths.cuda_fused_layers:
        fuse_cuda_layers(model)
        if int4_modules:
            prepare_for_cuda(model, config.dtype)
    return model


def torch_engine(model: nn.Module, args: ModelArgs, tokenizer: TextTokenizer,
                 config: EngineConfig) -> Engine:
    """An engine over a built model: the PyTorch runner composed with the engine."""
    return Engine(ModelRunner(model, args, config), tokenizer, config, args.vocab_size)


def build_engine(checkpoint: Checkpoint, config: EngineConfig) -> Engine:
    model = build_model(checkpoint, config)
    return torch_engine(model, checkpoint.args, checkpoint.tokenizer, config)
