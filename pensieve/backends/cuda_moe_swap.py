"""Which MoE expert modules become ``cuda_moe.CudaMoEExperts`` at a CUDA start, and the swap.

``take_expert_codes`` picks, out of a checkpoint's kept codes, each layer whose three stacked
projections (``loaders.int4_codes.ExpertCodes``: a GGUF's ``ffn_*_exps``, or gpt-oss's MXFP4
experts from either source) the fused kernels take; ``swap_in_experts`` replaces that layer's
torch module — ``models.moe.Experts`` (SiLU·up) or gpt-oss's ``ClampedSwiGLUExperts`` (its
loaded biases and clamp carried over) — by ``CudaMoEExperts`` over the codes, and allows the
model's CUDA graphs where no torch expert loop (host syncs on expert counts) is left.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from pensieve.backends.cuda_moe import Codes, CudaMoEExperts, fmt, gate_up_format

log = logging.getLogger(__name__)

EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")
Experts3 = tuple[Codes, Codes, Codes]  # one layer's gate, up, down codes ([E·rows, K] views)


def takes(gate: Codes, up: Codes, down: Codes) -> bool:
    """Whether ``CudaMoEExperts`` takes a layer's three projections."""
    return gate_up_format(gate, up) is not None and fmt(down) is not None


def take_expert_codes(int4: dict[str, object]) -> dict[str, Experts3]:
    """Take the stacked expert codes (``loaders.int4_codes.ExpertCodes``) of each layer whose
    three projections the kernels take out of a checkpoint's kept codes (``int4``, changed in
    place): ``Experts`` module path → (gate, up, down). The rest stay for ``plan_experts``."""
    from pensieve.loaders.int4_codes import ExpertCodes

    out: dict[str, Experts3] = {}
    for name in [n for n in int4 if n.endswith(".experts.gate_proj.weight")]:
        path = name[: -len(".gate_proj.weight")]
        keys = [f"{path}.{p}.weight" for p in EXPERT_PARTS]
        parts = [int4.get(k) for k in keys]
        if all(isinstance(c, ExpertCodes) for c in parts) and takes(*(c.groups for c in parts)):
            out[path] = tuple(int4.pop(k).groups for k in keys)
    return out


def expert_state_names(experts: Mapping[str, Experts3]) -> set[str]:
    """The float parameters ``swap_in_experts`` stands in for (not loaded: no error)."""
    return {f"{path}.{p}.weight" for path in experts for p in ("gate_up_proj", "down_proj")}


def _cuda_experts(old: nn.Module, path: str, codes: Experts3, num_experts: int
                  ) -> CudaMoEExperts:
    """``CudaMoEExperts`` standing in for ``old`` (``models.moe.Experts``, or gpt-oss's
    ``ClampedSwiGLUExperts`` with its loaded biases and clamp)."""
    from pensieve.models.gpt_oss import ClampedSwiGLUExperts
    from pensieve.models.moe import Experts

    if type(old) is Experts:
        return CudaMoEExperts(*codes, num_experts)
    if type(old) is ClampedSwiGLUExperts:
        return CudaMoEExperts(*codes, num_experts, gate_up_bias=old.gate_up_proj.bias,
                              down_bias=old.down_proj.bias, glu=(old.alpha, old.limit))
    raise TypeError(f"{path} is {type(old).__name__}: its codes have no CUDA layer")


def swap_in_experts(model: nn.Module, experts: Mapping[str, Experts3], num_experts: int, *,
                    consume: bool = False, top_k: int = 0) -> int:
    """Replace each named ``models.moe.Experts`` (or gpt-oss ``ClampedSwiGLUExperts``) module
    by ``CudaMoEExperts`` over its codes (``take_expert_codes``' choice); where no torch expert
    loop is left, the model's CUDA graphs are allowed (no host sync remains in its MLPs) as far
    as its paged kernels are. ``consume``: each layer's codes are taken out of ``experts`` (a
    dict) once its module is built. ``top_k``: the picks a token, kept on each module for
    ``cuda_moe_tune`` (0: unknown, its routes left to the constant rule)."""
    from pensieve.models.gpt_oss import ClampedSwiGLUExperts
    from pensieve.models.moe import Experts

    count = len(experts)
    for path in list(experts):
        codes = experts.pop(path) if consume else experts[path]  # type: ignore[attr-defined]
        parent, _, attr = path.rpartition(".")
        layer = _cuda_experts(model.get_submodule(path), path, codes, num_experts)
        layer.top_k = top_k
        setattr(model.get_submodule(parent), attr, layer)
        del codes
    if not count:
        return 0
    fast = getattr(model, "fast_paths", None)
    left = sum(isinstance(m, (Experts, ClampedSwiGLUExperts)) for m in model.modules())
    if not left and fast is not None and fast.paged_kernels:
        model.fast_paths = replace(fast, cuda_graphs=True)
    first = next(m for m in model.modules() if isinstance(m, CudaMoEExperts))
    log.info("MoE experts as codes on CUDA: %d layers (%s)%s", count, first.extra_repr(),
             f"; {left} layers dequantised" if left else "")
    return count
