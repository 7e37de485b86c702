"""Build the PyTorch engine for a checkpoint: model class, weights, dtype, device."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pensieve.engine.config import EngineConfig
from pensieve.engine.engine import Engine
from pensieve.backends.model_runner import ModelRunner
from pensieve.loaders.checkpoint import Checkpoint
from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.args import ModelArgs
from pensieve.models.llama import family_of
from pensieve.backends import (
    cuda_int8_tune, cuda_moe_tune, cuda_q6k_tune, cuda_tables, weights_pool,
)
from pensieve.backends.cuda_int4 import prepare_for_cuda
from pensieve.backends.cuda_layers import fuse_cuda_layers, plan_fused_mlps
from pensieve.backends.cuda_moe_swap import (
    Experts3, expert_state_names, swap_in_experts, take_expert_codes,
)
from pensieve.backends.quantize import (
    Codes, Parts, Q8, int8_lm_head, plan_experts, plan_int4, plan_q8, plan_tables, swap_in,
    swap_in_tables,
)
from pensieve.models.packing import pack_weights
from pensieve.models.registry import model_class

log = logging.getLogger(__name__)


@dataclass
class ModelWeights:
    """What a model is assembled from: float parameters in the module's own (fused) names,
    the token embedding / output layer kept as codes (``plan_tables``), module path → codes
    parts (``plan_int4``), and a tied Q8_0 head's codes (``plan_q8``). ``plan_weights`` makes it
    from a checkpoint; ``backends/packed_cache.py`` from a packed copy on disk."""

    floats: dict[str, torch.Tensor]
    tables: dict[str, Codes] = field(default_factory=dict)
    modules: dict[str, Parts] = field(default_factory=dict)
    head_q8: Q8 | None = None
    experts: dict[str, Experts3] = field(default_factory=dict)  # CUDA: MoE experts as codes


def plan_weights(checkpoint: Checkpoint, config: EngineConfig, *, packed: Mapping[str, tuple[str, ...]]
                 ) -> ModelWeights:
    """The checkpoint's weights planned onto the model's modules (``packed``: its fused ones)."""
    args = checkpoint.args
    on_cuda = torch.device(config.device).type == "cuda"
    int4, int8 = dict(checkpoint.int4), dict(checkpoint.int8)
    moe_codes = not on_cuda and family_of(args).fast_paths(args, config.context_length).cpu_moe_codes
    # CUDA: the experts of a family whose MoE is models.moe's (the promise cpu_moe_codes makes;
    # SiLU only) or that declared cuda_moe_codes (gpt-oss) stay codes on the fused kernels; the
    # rest are dequantised by plan_experts
    paths = family_of(args).fast_paths(args, config.context_length)
    cuda_experts = take_expert_codes(int4) if on_cuda and (
        paths.cuda_moe_codes or (args.hidden_act == "silu" and paths.cpu_moe_codes)) else {}
    expert_floats = plan_experts(int4, keep=moe_codes, dtype=config.dtype)
    if on_cuda:  # the token table and output layer as their codes on the CUDA kernels
        table_codes, table_floats = cuda_tables.plan(int4, int8, args.tie_word_embeddings)
    else:
        table_codes, table_floats = plan_tables(int4, args.tie_word_embeddings,
                                                config.int8_lm_head)
    int4_modules, int4_floats = plan_int4(int4, packed)
    head_q8, q8_floats = plan_q8(int8, args.tie_word_embeddings,
                                 config.int8_lm_head and not on_cuda)
    weights = pack_weights({**checkpoint.weights, **expert_floats, **int4_floats, **q8_floats,
                            **table_floats},
                           packed)
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return ModelWeights(weights, table_codes, int4_modules, head_q8, cuda_experts)


def build_model(checkpoint: Checkpoint, config: EngineConfig,
                weights: ModelWeights | None = None) -> nn.Module:
    """Instantiate the architecture and load the checkpoint's weights (or ``weights``, already
    planned), strictly."""
    args = checkpoint.args
    with torch.device("meta"):
        model = model_class(args)(args, max_positions=config.context_length)
    if weights is None:
        weights = plan_weights(checkpoint, config, packed=getattr(model, "PACKED", {}))
    return assemble_model(model, args, config, weights)


def assemble_model(model: nn.Module, args: ModelArgs, config: EngineConfig,
                   planned: ModelWeights) -> nn.Module:
    """``model`` (on meta) with ``planned``'s weights loaded and its codes swapped in."""
    on_cuda = torch.device(config.device).type == "cuda"
    # asked before place_weights, which lets a CUDA model's codes go as it builds the layers;
    # an MoE model's attention projections are planned too (its experts were swapped)
    tune_int4 = bool(planned.modules) and (model.fast_paths.cuda_fused_layers
                                           or bool(planned.experts))
    started = time.perf_counter()
    place_weights(model, args, config, planned)
    model = model.to(device=config.device, dtype=config.dtype).eval()
    if on_cuda:  # a start's phases in its log: tuning takes seconds on a first start
        log.info("layers built on %s [%.2f s]; planning their kernels", config.device,
                 time.perf_counter() - started)
        started = time.perf_counter()
        finish_on_cuda(model, config, tune_int4)
        log.info("kernels planned [%.2f s]", time.perf_counter() - started)
    return model


def finish_on_cuda(model: nn.Module, config: EngineConfig, tune_int4: bool) -> None:
    """A model on its GPU: fused layers, the int4 layers' timed plans (``tune_int4``), the
    Q6_K layers' tiles per weight shape, checked and timed, and the MoE experts' route per
    decode bucket (``cuda_moe_tune``)."""
    if model.fast_paths.cuda_fused_layers:
        fuse_cuda_layers(model)
    if tune_int4:
        prepare_for_cuda(model, config.dtype, keep_dense=config.keep_dense_weights)
        if model.fast_paths.cuda_fused_layers:  # the 1-row gate/up GEMV with SiLU·up in it
            note = plan_fused_mlps(model, config.dtype)
            if note:
                log.info("gate/up GEMV with SiLU·up, µs per call: %s", note)
    cuda_q6k_tune.prepare(model, config.dtype)
    cuda_int8_tune.prepare(model, config.dtype)  # Q8_0/Q5_x/IQ4_x layers' route per row bucket
    cuda_moe_tune.prepare(model, config.dtype)  # MoE experts' route per decode bucket
    # the weights into a pool of their own (before any CUDA graph records their addresses):
    # what the load freed between them can then go back to the driver
    weights_pool.compact_on_cuda(model, torch.device(config.device))
    # the tuners' temporaries (random inputs up to 2048 rows, float32 references of whole
    # weights, a head's among them) back to the driver, not left in torch's cache
    torch.cuda.empty_cache()


def place_weights(model: nn.Module, args: ModelArgs, config: EngineConfig,
                  planned: ModelWeights) -> None:
    """Load ``planned``'s float weights into ``model`` (on meta) and swap in the layers over its
    codes for ``config.device`` — on the CPU still (so a CPU test can count what a CUDA model
    will hold: ``weight_bytes.held_bytes``)."""
    on_cuda = torch.device(config.device).type == "cuda"
    table_codes, int4_modules, head_q8 = planned.tables, planned.modules, planned.head_q8
    missing, unexpected = model.load_state_dict(planned.floats, strict=False, assign=True)
    swapped = {f"{path}.weight" for path in int4_modules}
    if args.tie_word_embeddings:
        swapped.add("lm_head.weight")
    if head_q8 is not None:  # the int8 output layer (and a tied embedding) from its codes
        swapped.add("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight")
    swapped |= set(table_codes) | expert_state_names(planned.experts)
    missing = [k for k in missing if k not in swapped]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not fit {args.architecture}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if args.tie_word_embeddings and not table_codes:
        model.lm_head.weight = model.model.embed_tokens.weight
    (cuda_tables.swap_in if on_cuda else swap_in_tables)(model, table_codes,
                                                         args.tie_word_embeddings)
    # CUDA: each layer's codes are let go once its buffers are built (the GPU's peak at start)
    swap_in(model, int4_modules, kernel="cuda_int4" if on_cuda else "auto", consume=on_cuda)
    swap_in_experts(model, planned.experts, args.moe.num_experts if planned.experts else 0,
                    consume=on_cuda, top_k=args.moe.top_k if planned.experts else 0)
    if config.int8_lm_head:
        int8_lm_head(model, q8=head_q8)


def torch_engine(model: nn.Module, args: ModelArgs, tokenizer: TextTokenizer,
                 config: EngineConfig) -> Engine:
    """An engine over a built model: the PyTorch runner composed with the engine."""
    return Engine(ModelRunner(model, args, config), tokenizer, config, args.vocab_size)


def build_engine(checkpoint: Checkpoint, config: EngineConfig,
                 weights: ModelWeights | None = None) -> Engine:
    model = build_model(checkpoint, config, weights)
    return torch_engine(model, checkpoint.args, checkpoint.tokenizer, config)
