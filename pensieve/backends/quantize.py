"""Swap a loaded model's linear layers for weight-only quantised ones (CPU decode speed).

Which module a kept weight becomes (``kernel``); its parts are ``Int4Groups`` (Q4_0/Q4_1/Q4_K)
or ``Int8Groups`` (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, IQ4_NL, IQ4_XS), see ``loaders/int4_codes.py``:

* ``"cpu_quant"`` — over the compiled kernels of ``backends/cpu_quant``: ``Q4Linear`` where every
  part is 4-bit, else ``CodesLinear`` (row blocks each in its own code format);
* ``"aten"`` — ``Int4Linear`` over PyTorch's own int4 op (fast only with AVX-512);
* ``"cuda_int4"`` — ``CudaInt4Linear`` over the Triton kernels of ``backends/cuda_int4``,
  ``CudaInt8Linear`` (``backends/cuda_int8``) for int8 codes, ``CudaMixedLinear`` where a fused
  weight mixes both (the model is moved to the GPU afterwards);
* ``"float"`` — a plain ``nn.Linear`` holding the dequantised weight;
* ``"auto"`` — ``cpu_quant`` where it compiles and fits the shape, else ``aten``.

Where no kernel takes a weight (``aten`` given int8 codes, or an odd shape) it is
dequantised into a plain ``nn.Linear``. With ``cpu_quant``, a Llama MLP whose two projections
both run on the kernels is itself replaced by ``Q4MLP`` (same children, same state dict), which
runs it in one kernel call.

``kernel_choice.choose`` decides whether quantised weights are worth it at all; this module
only carries the decision out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.backends.cpu_quant import (
    Kernels, Q4Linear, Q8Embedding, Q8Linear, kernel_fits, load_kernels, pack_q8,
)
from pensieve.backends.cpu_quant.codes_linear import (
    CodesEmbedding, CodesLinear, blocks_fit, proj_of, super_scaled,
)
from pensieve.backends.cpu_quant.expert_linear import SlicedExperts
from pensieve.backends.cpu_quant.mlp import Q4MLP
from pensieve.backends.cuda_int4 import CudaInt4Linear
from pensieve.backends.cuda_int8 import cuda_codes_linear
from pensieve.models.llama import MLP
from pensieve.models.moe import Experts
from pensieve.loaders.int4_codes import ExpertCodes, Int8Groups
from pensieve.models.quant_linear import Int4Groups, Int4Linear, Int8Linear, int4_supported

log = logging.getLogger(__name__)

KERNELS = ("auto", "cpu_quant", "aten", "cuda_int4", "float")
Codes = Int4Groups | Int8Groups
Parts = tuple[Codes, ...]  # a weight, or the row blocks of a fused one (q, k, v), in order


def concat_groups(parts: Sequence[Int4Groups]) -> Int4Groups:
    return Int4Groups(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        offsets=torch.cat([p.offsets for p in parts]),
        group_size=parts[0].group_size,
    )


def _dequantize(parts: Sequence[Codes]) -> torch.Tensor:
    return torch.cat([p.dequantize() for p in parts]) if len(parts) > 1 else parts[0].dequantize()


def plan_int4(
    int4: Mapping[str, Codes], packed: Mapping[str, tuple[str, ...]]
) -> tuple[dict[str, Parts], dict[str, torch.Tensor]]:
    """Map HF-named kept weights (codes) onto the model's (possibly fused) modules.

    Returns (module path → its parts, stacked along the output rows when it is built) for
    modules whose every part was kept as codes, and HF name → float weight for the rest (a
    fused module with a part that was not). The parts are not concatenated here:
    the q4 kernel packs them straight into place (a concatenation costs seconds of start-up
    on a busy 2-core machine).
    """
    modules: dict[str, Parts] = {}
    leftovers = dict(int4)
    for fused, parts in packed.items():
        for name in [n for n in int4 if n.endswith(f".{parts[0]}.weight")]:
            prefix = name[: -len(f"{parts[0]}.weight")]
            keys = [f"{prefix}{p}.weight" for p in parts]
            groups = [int4.get(k) for k in keys]
            if all(g is not None for g in groups):
                modules[f"{prefix}{fused}"] = tuple(groups)
                for k in keys:
                    leftovers.pop(k)
    for name in list(leftovers):
        if not any(name.endswith(f".{p}.weight") for parts in packed.values() for p in parts):
            modules[name[: -len(".weight")]] = (leftovers.pop(name),)
    floats = {name: g.dequantize() for name, g in leftovers.items()}
    return modules, floats


def _float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def _int4_module(parts: Parts, bias: torch.Tensor | None, kernel: str,
                 kernels: Kernels | None) -> nn.Module:
    k, group = parts[0].shape[1], parts[0].group_size
    int4 = all(isinstance(p, Int4Groups) for p in parts) and len({p.group_size for p in parts}) == 1
    if kernel == "cuda_int4" and int4 and group == 32:
        return CudaInt4Linear(parts, bias)
    if kernel == "cuda_int4" and (layer := cuda_codes_linear(parts, bias)) is not None:
        return layer  # int8 codes (Q8_0, Q5_x, Q6_K...), alone or beside int4 parts
    if kernel in ("auto", "cpu_quant") and kernels is not None:
        if int4 and kernel_fits(k, group) and not all(map(super_scaled, parts)):
            return Q4Linear(kernels, parts, bias)  # Q4_K with its own scales: CodesLinear
        if blocks_fit(parts):
            return CodesLinear(kernels, parts, bias)
    if kernel in ("auto", "aten") and int4 and int4_supported(group, k):
        return Int4Linear(concat_groups(parts), bias)
    if kernel not in ("float", "cuda_int4") or int4:
        kinds = sorted({getattr(p, "ggml_type", "") or "4-bit" for p in parts})
        log.warning("no %s kernel for %s K=%d: float weights", kernel, "+".join(kinds), k)
    return _float_linear(_dequantize(parts), bias)


def swap_in(model: nn.Module, modules: Mapping[str, Codes | Sequence[Codes]],
            kernel: str = "auto", *, consume: bool = False) -> None:
    """Replace each named module (an ``nn.Linear`` on meta) by its quantised form, built from
    one ``Int4Groups``/``Int8Groups`` or the parts ``plan_int4`` gives for it. ``consume``:
    each entry is taken out of ``modules`` (a dict) as its layer is built, so that the codes'
    intermediate forms are freed one layer at a time (a GPU's peak during a start)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    kernels = load_kernels() if modules and kernel in ("auto", "cpu_quant") else None
    kinds: dict[str, int] = {}
    for path in list(modules):
        groups = modules.pop(path) if consume else modules[path]  # type: ignore[attr-defined]
        parent_path, _, attr = path.rpartition(".")
        old = model.get_submodule(path)
        bias = old.bias if isinstance(old, nn.Linear) and old.bias is not None else None
        parts = (groups,) if isinstance(groups, (Int4Groups, Int8Groups)) else tuple(groups)
        new = _int4_module(parts, bias, kernel, kernels)
        kinds[type(new).__name__] = kinds.get(type(new).__name__, 0) + 1
        setattr(model.get_submodule(parent_path), attr, new)
    fused = fuse_mlps(model)
    sliced = slice_experts(model)
    if kinds:
        log.info("quantised layers: %s; %d fused MLPs%s",
                 ", ".join(f"{n} {c}" for n, c in sorted(kinds.items())), fused,
                 f"; {sliced} MoE layers' experts as codes" if sliced else "")


EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def plan_experts(int4: dict[str, object], keep: bool, dtype: torch.dtype = torch.float32
                 ) -> dict[str, torch.Tensor]:
    """Take a checkpoint's stacked expert codes (``ExpertCodes``, a GGUF's 3-D ``ffn_*_exps``)
    out of ``int4`` (changed in place): where ``keep`` (the family declared ``cpu_moe_codes``
    and the model stays on the CPU) and the kernels take a layer's three projections, their
    [E·N, K] codes go back into ``int4`` for ``plan_int4``/``swap_in`` (one stacked
    ``CodesLinear``/``Q4Linear`` each, sliced per expert by ``slice_experts``); the rest are
    returned dequantised, HF name → ``dtype`` [E, N, K]."""
    experts = {n: int4.pop(n) for n in list(int4) if isinstance(int4[n], ExpertCodes)}
    kernels = load_kernels() if keep and experts else None
    layers: dict[str, list[str]] = {}
    for name in experts:
        layers.setdefault(name.rsplit(".", 2)[0], []).append(name)
    floats: dict[str, torch.Tensor] = {}
    for prefix, names in layers.items():
        by_proj = {n.rsplit(".", 2)[1]: experts[n].groups for n in names}
        fits = (kernels is not None and set(by_proj) == set(EXPERT_PROJS)
                and blocks_fit((by_proj["gate_proj"], by_proj["up_proj"]))
                and blocks_fit((by_proj["down_proj"],)))
        for n in names:
            if fits:
                int4[n] = experts[n].groups
            else:
                floats[n] = experts[n].dequantize().to(dtype)
    return floats


def slice_experts(model: nn.Module) -> int:
    """Replace each ``models.moe.Experts`` whose two projections are stacked code layers on the
    compiled kernels by ``SlicedExperts`` (same children), where the model declared
    ``fast_paths.cpu_moe_codes``; the number replaced."""
    fast = getattr(model, "fast_paths", None)
    if fast is None or not getattr(fast, "cpu_moe_codes", False):
        return 0
    targets = [name for name, m in model.named_modules() if type(m) is Experts
               and proj_of(m.gate_up_proj) is not None and proj_of(m.down_proj) is not None]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        silu = old.act is F.silu
        setattr(model.get_submodule(parent), attr, SlicedExperts(
            old.gate_up_proj, old.down_proj, old.num_experts, old.act, silu))
    return len(targets)


def fuse_mlps(model: nn.Module) -> int:
    """Replace each ``models.llama.MLP`` with two children on the compiled kernels (``Q4Linear``,
    ``CodesLinear``...) by ``Q4MLP``, where
    the model declared the fused SiLU MLP (``fast_paths.cpu_fused_mlp``)."""
    fast = getattr(model, "fast_paths", None)
    if fast is None or not fast.cpu_fused_mlp:
        return 0
    targets = [name for name, m in model.named_modules() if type(m) is MLP
               and proj_of(m.gate_up_proj) is not None and proj_of(m.down_proj) is not None]
    for name in targets:
        parent, _, attr = name.rpartition(".")
        mlp = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, Q4MLP(mlp.gate_up_proj, mlp.down_proj))
    return len(targets)


Q8 = tuple[torch.Tensor, torch.Tensor]  # Q8_0 codes int8 [N, K], float16 scales [N, K/32]


def plan_q8(int8: Mapping[str, Q8], tied: bool, int8_head: bool) -> tuple[Q8 | None, dict[str, torch.Tensor]]:
    """A checkpoint's kept Q8_0 matrices: the tied embedding's codes when the output layer
    goes int8 on the compiled kernels (``int8_lm_head(model, q8=...)`` takes them as they
    are), and every other one dequantised (HF name → float32)."""
    head = None
    name = "model.embed_tokens.weight"
    if int8_head and tied and name in int8 and kernel_fits(int8[name][0].shape[1]) and (
            load_kernels() is not None):
        head = int8[name]
    floats = {n: (c.float().view(c.shape[0], -1, 32) * s.float()[..., None]).view(c.shape)
              for n, (c, s) in int8.items() if not (head is not None and n == name)}
    return head, floats


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def plan_tables(int4: dict[str, Codes], tied: bool, head_codes: bool
                ) -> tuple[dict[str, Codes], dict[str, torch.Tensor]]:
    """Take the token embedding and output layer out of a checkpoint's kept codes (``int4``,
    changed in place): (HF name → codes kept on the compiled kernels, HF name → float weight).

    The embedding stays codes where the kernels take its format (``CodesEmbedding``: a
    1.5B Qwen's Q4_K table is 130 MB, not 933 MB of float32); the output layer where
    ``head_codes`` (the int8 head was chosen: a Q6_K head runs on its own codes instead of
    being dequantised and re-packed to Q8_0). A tied pair stays codes only together.
    """
    tables = {n: int4.pop(n) for n in (EMBED, HEAD) if n in int4}
    if not tables:
        return {}, {}
    kernels = load_kernels()
    fits = lambda g: kernels is not None and blocks_fit((g,))  # noqa: E731
    keep: dict[str, Codes] = {}
    if EMBED in tables and fits(tables[EMBED]) and (not tied or head_codes):
        keep[EMBED] = tables[EMBED]
    if HEAD in tables and head_codes and fits(tables[HEAD]) and not tied:
        keep[HEAD] = tables[HEAD]
    return keep, {n: g.dequantize() for n, g in tables.items() if n not in keep}


def swap_in_tables(model: nn.Module, tables: Mapping[str, Codes], tied: bool) -> None:
    """Put the codes ``plan_tables`` kept in place: the embedding as ``CodesEmbedding``, the
    output layer as ``CodesLinear`` (for a tied pair, one table shared by both)."""
    if not tables:
        return
    kernels = load_kernels()
    if EMBED in tables:
        table = CodesLinear(kernels, tables[EMBED])
        model.model.embed_tokens = CodesEmbedding(table)
        if tied:
            model.lm_head = table
    if HEAD in tables:
        model.lm_head = CodesLinear(kernels, tables[HEAD])
    log.info("kept as codes: %s", ", ".join(
        f"{n.split('.')[-2]} {getattr(g, 'ggml_type', '') or 'q4'}" for n, g in tables.items()))


def int8_lm_head(model: nn.Module, kernel: str = "auto", q8: Q8 | None = None) -> None:
    """The output projection as int8: the largest single read of a small model's decode.

    With the compiled kernels it becomes ``Q8Linear`` (Q8_0 blocks, exact for a Q8_0 GGUF
    tensor; ``q8``: its codes as they are — a tied head's straight from the file, or an untied
    one's packed before — with the weight never loaded),
    and a tied input embedding reads its rows from the same codes, so the float matrix is
    dropped from memory. Without them, PyTorch's per-row int8 op (``"aten"``).
    """
    head = model.lm_head
    if not isinstance(head, nn.Linear):  # already codes (``swap_in_tables``)
        return
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = isinstance(embed, nn.Embedding) and embed.weight is head.weight
    kernels = load_kernels() if kernel in ("auto", "cpu_quant") else None
    if q8 is not None and kernels is None:
        raise ValueError("Q8_0 codes need the compiled kernels")
    weight = None if q8 is not None else head.weight.detach()
    if kernels is not None and kernel_fits(head.in_features):
        codes, scales = (q8[0], q8[1].view(torch.int16)) if q8 is not None else pack_q8(kernels, weight)
        bias = head.bias.detach() if head.bias is not None else None
        model.lm_head = Q8Linear(kernels, codes, scales, bias)
        if tied:
            model.model.embed_tokens = Q8Embedding(kernels, codes, scales)
        log.info("lm_head as q8 (%d×%d)%s", head.out_features, head.in_features,
                 ", embedding shares it" if tied else "")
        return
    if kernel == "cpu_quant":
        log.warning("no q8 kernel for lm_head: PyTorch's int8 op")
    model.lm_head = Int8Linear(weight, None)
    log.info("lm_head as int8 (%d×%d)", head.out_features, head.in_features)
