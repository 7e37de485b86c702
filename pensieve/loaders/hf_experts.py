"""An HF checkpoint's tensor names → the names its family's module holds.

Two things differ between a safetensors folder and the module:

- a family's renamed segments (``Family.hf_renames``: Mixtral's ``block_sparse_moe.w1``
  is ``mlp.gate_proj``);
- experts: ``save_pretrained`` writes one matrix per expert (``mlp.experts.3.gate_proj.weight``);
  transformers 5 holds, and some exporters write, one fused 3-D tensor
  (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]). Both become
  the stacked ``mlp.experts.{gate,up,down}_proj.weight`` [E, rows, K] that a GGUF's
  ``ffn_*_exps`` are too (``models/packing.py`` then fuses gate and up).

``plan`` works on shapes (headers only, for validation before reading); ``assemble`` builds the
tensors. A dense checkpoint passes through unchanged, without copies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")


@dataclass(frozen=True)
class Source:
    """Where one module weight comes from: one file tensor, several stacked along a new
    dim 0 (one per expert, in order), or one half of a fused gate_up tensor (``half``)."""

    names: tuple[str, ...]
    stacked: bool = False
    half: int | None = None


def rename(name: str, renames: Mapping[str, str]) -> str:
    return ".".join(renames.get(part, part) for part in name.split("."))


def plan(shapes: Mapping[str, tuple[int, ...]], renames: Mapping[str, str]
         ) -> tuple[dict[str, Source], dict[str, tuple[int, ...]]]:
    """(module name → its ``Source``, module name → shape) for a file's tensor ``shapes``."""
    sources: dict[str, Source] = {}
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[int, str]] = {}
    for disk, shape in shapes.items():
        name = rename(disk, renames)
        if m := _PER_EXPERT.fullmatch(name):
            experts.setdefault(f"{m.group(1)}.{m.group(3)}.weight", {})[int(m.group(2))] = disk
        elif (m := _FUSED.fullmatch(name)) and len(shape) == 3:
            if m.group(2) == "down_proj":
                sources[f"{name}.weight"], out[f"{name}.weight"] = Source((disk,)), shape
                continue
            rows = shape[1] // 2
            for half, part in enumerate(("gate_proj", "up_proj")):
                key = f"{m.group(1)}.{part}.weight"
                sources[key], out[key] = Source((disk,), half=half), (shape[0], rows, shape[2])
        else:
            sources[name], out[name] = Source((disk,)), shape
    for name, by_index in experts.items():
        names = tuple(by_index[i] for i in sorted(by_index))
        if sorted(by_index) != list(range(len(by_index))):
            # a gap: report the stack as misshapen rather than guess (validation names it)
            out[name] = (-1,)
        else:
            out[name] = (len(names), *shapes[names[0]])
        sources[name] = Source(names, stacked=True)
    return sources, out


def assemble(tensors: Mapping[str, torch.Tensor], sources: Mapping[str, Source]
             ) -> dict[str, torch.Tensor]:
    """Module name → tensor, from the file's ``tensors`` by name."""
    out: dict[str, torch.Tensor] = {}
    for name, src in sources.items():
        if not all(n in tensors for n in src.names):
            continue
        if src.stacked:
            out[name] = torch.stack([tensors[n] for n in src.names])
        elif src.half is not None:
            out[name] = tensors[src.names[0]].chunk(2, dim=1)[src.half].contiguous()
        else:
            out[name] = tensors[src.names[0]]
    return out
