"""An HF checkpoint's tensor names → the names its family's module holds.

Two things differ between a safetensors folder and the module:

- a family's renamed segments (``Family.hf_renames``: Mixtral's ``block_sparse_moe.w1``
  is ``mlp.gate_proj``);
- experts: ``save_pretrained`` writes one matrix per expert (``mlp.experts.3.gate_proj.weight``);
  transformers 5 holds, and some exporters write, one fused 3-D tensor
  (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]). Both become
  the stacked ``mlp.experts.{gate,up,down}_proj.weight`` [E, rows, K] that a GGUF's
  ``ffn_*_exps`` are too (``models/packing.py`` then fuses gate and up).

gpt-oss (``layout="gpt_oss"``) holds its experts input-major with gate and up columns
interleaved: ``gate_up_proj`` [E, H, 2I] (gate = even columns), ``down_proj`` [E, I, H], biases
``gate_up_proj_bias`` [E, 2I] and ``down_proj_bias`` [E, H]; its released checkpoints store the
matrices as MXFP4 ``*_blocks`` [E, rows, G, 16] + ``*_scales`` [E, rows, G] (already [E, out, in],
gate/up rows interleaved). Each becomes the same stacked ``{gate,up,down}_proj.{weight,bias}``.

``plan`` works on shapes (headers only, for validation before reading); ``assemble`` builds the
tensors. A dense checkpoint passes through unchanged, without copies. Asked to (``codes``),
``assemble`` keeps MXFP4 experts packed (``int4_codes.ExpertCodes`` over ``mxfp4.Mxfp4Groups``,
the GGUF path's form; ``mxfp4.hf_packed``), or as exact int8 codes with ``PENSIEVE_MXFP4_INT8=1``
(``mxfp4.hf_int8``), gate/up rows split as for the floats.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pensieve.loaders import mxfp4
from pensieve.loaders.int4_codes import ExpertCodes, Int8Groups

_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")
_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")
_OSS = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")


@dataclass(frozen=True)
class Source:
    """Where one module weight comes from: one file tensor, several stacked along a new
    dim 0 (one per expert, in order), or one half of a fused gate_up tensor (``half``)."""

    names: tuple[str, ...]
    stacked: bool = False
    half: int | None = None
    # gpt-oss: "T" (swap the last two dims), "even"/"odd" (every other column, then "T" for a
    # matrix), "mxfp4" (names = blocks, scales), "mxfp4_even"/"mxfp4_odd" (every other row)
    op: str | None = None


def rename(name: str, renames: Mapping[str, str]) -> str:
    """``name`` with each segment renamed; a segment renamed to "" is dropped (Qwen3.5's
    ``model.language_model.layers…`` → ``model.layers…``)."""
    return ".".join(p for p in (renames.get(part, part) for part in name.split(".")) if p)


def plan(shapes: Mapping[str, tuple[int, ...]], renames: Mapping[str, str],
         layout: str = "stacked") -> tuple[dict[str, Source], dict[str, tuple[int, ...]]]:
    """(module name → its ``Source``, module name → shape) for a file's tensor ``shapes``;
    ``layout``: the family's ``hf_expert_layout``."""
    sources: dict[str, Source] = {}
    out: dict[str, tuple[int, ...]] = {}
    experts: dict[str, dict[int, str]] = {}
    for disk, shape in shapes.items():
        name = rename(disk, renames)
        if layout == "gpt_oss" and (m := _OSS.fullmatch(name)):
            _plan_gpt_oss(disk, shape, m, shapes, sources, out)
        elif m := _PER_EXPERT.fullmatch(name):
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


def assemble(tensors: Mapping[str, torch.Tensor], sources: Mapping[str, Source],
             codes: dict[str, ExpertCodes] | None = None) -> dict[str, torch.Tensor]:
    """Module name → tensor, from the file's ``tensors`` by name; with ``codes``, MXFP4
    experts whose scales float16 holds go there instead (``expert_codes``)."""
    out: dict[str, torch.Tensor] = {}
    for name, src in sources.items():
        if not all(n in tensors for n in src.names):
            continue
        if codes is not None and src.op is not None and src.op.startswith("mxfp4") and (
                kept := expert_codes(src.op, [tensors[n] for n in src.names], name)) is not None:
            codes[name] = kept
        elif src.op is not None:
            out[name] = _apply(src.op, [tensors[n] for n in src.names])
        elif src.stacked:
            out[name] = torch.stack([tensors[n] for n in src.names])
        elif src.half is not None:
            out[name] = tensors[src.names[0]].chunk(2, dim=1)[src.half].contiguous()
        else:
            out[name] = tensors[src.names[0]]
    return out


def _plan_gpt_oss(disk: str, shape: tuple[int, ...], m: re.Match[str],
                  shapes: Mapping[str, tuple[int, ...]], sources: dict[str, Source],
                  out: dict[str, tuple[int, ...]]) -> None:
    """One gpt-oss expert tensor's module names (see the module docstring)."""
    prefix, proj, kind = m.group(1), m.group(2), m.group(3) or ""
    if kind == "_scales":
        return  # read with its blocks
    parts = (("gate_proj", "even"), ("up_proj", "odd")) if proj == "gate_up_proj" else (
        ("down_proj", None),)
    for part, pick in parts:
        key = f"{prefix}.{part}." + ("bias" if kind == "_bias" else "weight")
        if kind == "_blocks":
            scales = disk[: -len("_blocks")] + "_scales"
            rows = shape[1] // len(parts)
            fits = len(shape) == 4 and shapes.get(scales) == shape[:3]
            sources[key] = Source((disk, scales), op="mxfp4" + (f"_{pick}" if pick else ""))
            out[key] = (shape[0], rows, shape[2] * shape[3] * 2) if fits else (-1,)
        elif kind == "_bias":
            sources[key] = Source((disk,), op=pick)
            out[key] = (*shape[:-1], shape[-1] // len(parts))
        else:  # [E, in, out]
            sources[key] = Source((disk,), op=pick or "T")
            out[key] = (shape[0], shape[2] // len(parts), shape[1])


def expert_codes(op: str, tensors: list[torch.Tensor], name: str = "") -> ExpertCodes | None:
    """An "mxfp4[_even|_odd]" source (blocks [E, rows, G, 16], scales [E, rows, G]) kept
    packed (``mxfp4.Mxfp4Groups`` [E·N, K]), or with ``PENSIEVE_MXFP4_INT8=1`` as int8 codes
    [E·N, K] with float16 scales per 32, exactly; None where an exponent does not fit the form
    (``mxfp4.hf_packed`` / ``int8_codes`` log why)."""
    blocks, scales = tensors
    if mxfp4.packed_wanted():  # the file's bytes (GGML's nibble order), not int8 codes
        kept = mxfp4.hf_packed(blocks, scales, name)
        if kept is None:
            return None
        p, s = kept
        if op != "mxfp4":
            first = 0 if op.endswith("even") else 1
            p, s = p[:, first::2], s[:, first::2]
        e, rows = p.shape[:2]
        return ExpertCodes(mxfp4.Mxfp4Groups(p.reshape(e * rows, -1).contiguous(),
                                             s.reshape(e * rows, -1).contiguous()), e)
    kept = mxfp4.hf_int8(blocks, scales, name)
    if kept is None:
        return None
    c, s = kept
    if op != "mxfp4":  # gate/up rows interleaved: every other row
        first = 0 if op.endswith("even") else 1
        c, s = c[:, first::2], s[:, first::2]
    e, rows, k = c.shape
    return ExpertCodes(Int8Groups(c.reshape(e * rows, k).contiguous(),
                                  s.reshape(e * rows, -1).contiguous(), None, mxfp4.BLOCK,
                                  ggml_type="MXFP4"), e)


def _apply(op: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    first = 0 if op.endswith("even") else 1
    if op.startswith("mxfp4"):  # [E, rows, in]: gate/up rows interleaved
        w = mxfp4.hf_blocks(*tensors)
        return w if op == "mxfp4" else w[:, first::2].contiguous()
    t = tensors[0]
    if op in ("even", "odd"):  # along the last dim: a bias [E, 2I] or a matrix [E, H, 2I]
        t = t[..., first::2]
        if t.ndim == 2:
            return t.contiguous()
    return t.transpose(-1, -2).contiguous()
