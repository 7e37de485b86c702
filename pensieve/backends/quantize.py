"""Swap a loaded model's linear layers for weight-only quantised ones (CPU decode speed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from pensieve.models.quant_linear import Int4Groups, Int4Linear, Int8Linear, int4_supported

log = logging.getLogger(__name__)


def concat_groups(parts: list[Int4Groups]) -> Int4Groups:
    return Int4Groups(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        offsets=torch.cat([p.offsets for p in parts]),
        group_size=parts[0].group_size,
    )


def plan_int4(
    int4: Mapping[str, Int4Groups], packed: Mapping[str, tuple[str, ...]]
) -> tuple[dict[str, Int4Groups], dict[str, torch.Tensor]]:
    """Map HF-named int4 weights onto the model's (possibly fused) modules.

    Returns (module path → groups) for modules that can be int4 whole, and HF name → float
    weight for the rest (a fused module whose parts are not all int4 with one group size).
    """
    modules: dict[str, Int4Groups] = {}
    leftovers = dict(int4)
    for fused, parts in packed.items():
        for name in [n for n in int4 if n.endswith(f".{parts[0]}.weight")]:
            prefix = name[: -len(f"{parts[0]}.weight")]
            keys = [f"{prefix}{p}.weight" for p in parts]
            groups = [int4.get(k) for k in keys]
            if all(g is not None for g in groups) and len({g.group_size for g in groups}) == 1:
                modules[f"{prefix}{fused}"] = concat_groups(groups)
                for k in keys:
                    leftovers.pop(k)
    for name in list(leftovers):
        if not any(name.endswith(f".{p}.weight") for parts in packed.values() for p in parts):
            modules[name[: -len(".weight")]] = leftovers.pop(name)
    floats = {name: g.dequantize() for name, g in leftovers.items()}
    return modules, floats


def swap_in(model: nn.Module, modules: Mapping[str, Int4Groups]) -> None:
    for path, groups in modules.items():
        parent_path, _, attr = path.rpartition(".")
        old = model.get_submodule(path)
        if not int4_supported(groups.group_size, groups.codes.shape[1]):
            raise ValueError(f"{path}: no int4 kernel for group size {groups.group_size}")
        bias = old.bias if isinstance(old, nn.Linear) and old.bias is not None else None
        setattr(model.get_submodule(parent_path), attr, Int4Linear(groups, bias))


def int8_lm_head(model: nn.Module) -> None:
    """The output projection as int8: the largest single read of a small model's decode."""
    head = model.lm_head
    model.lm_head = Int8Linear(head.weight.detach(), None)
    log.info("lm_head as int8 (%d×%d)", head.out_features, head.in_features)
