"""Load a llama.cpp GGUF file into a ``Checkpoint`` (HF names, dense weights).

Three llama.cpp conventions are undone here:
- names: ``blk.N.attn_q.weight`` → ``model.layers.N.self_attn.q_proj.weight`` (each family's
  table in ``models/<family>.py``);
- shapes: GGUF lists dims innermost first (``ne``); ``GGUFFile`` already reverses them;
- Q/K row order: ``convert_hf_to_gguf.py`` permutes each head's rows from HF's
  rotate-half layout (first half, second half) to interleaved pairs; for
  architectures flagged ``permute_qk`` we permute them back.
"""

from __future__ import annotations

import re

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from pensieve.loaders.architectures import gguf_family, read_args, validate_shapes
from pensieve.loaders.checkpoint import Checkpoint, CheckpointError
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.load_progress import LoadProgress
from pensieve.loaders.int4_codes import Q8_NAMES, int4_groups, q8_0_codes
from pensieve.loaders.quants import dequantize
from pensieve.models.quant_linear import Int4Groups
from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.args import ModelArgs
from pensieve.models.family import Family, GGUFSource, past_trunk

_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def model_name(path: Path) -> str:
    """Served id from the file name, quant suffix dropped.

    ``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``SmolLM2-135M-Instruct``.
    """
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, *, keep_int4: bool = False,
    tensors: bool = True, tokenizer: TextTokenizer | None = None,
    device: str | torch.device | None = None, host_threads: int = 1,
) -> Checkpoint:
    """Read ``path`` (a .gguf file); CheckpointError if it is unsupported or damaged.

    With ``keep_int4``, quantised linear weights (``int4_codes.quant_groups``) go to
    ``Checkpoint.int4`` as exact codes instead of being dequantised into ``weights``, a Q8_0
    embedding or output matrix to ``Checkpoint.int8`` (the int8 output layer takes its codes as
    they are), and an embedding or output matrix of another quantised type to ``int4`` too
    (``backends.torch_backend.build_model`` keeps or dequantises them). ``tensors=False``
    reads everything but the weights (shapes still checked): for a model whose weights come
    from a packed copy (``backends/packed_cache.py``); ``tokenizer``: the vocabulary as
    built before (from the same copy), not built again. ``device`` (a GPU): each tensor's
    GGUF bytes are copied there first and decoded there — the codes, scales and dequantised
    floats come back on it, the same values bit for bit (the decoding is integer bit work and
    single float16/float32 roundings) in a fraction of the host's time. ``host_threads``: the
    torch threads a host decode takes (1 by default: a CPU server's cores are busy serving;
    a GPU server decoding on its host may take them all).
    """
    path = Path(path)
    gf = GGUFFile(path)
    arch = gf.get("general.architecture")
    if not isinstance(arch, str):
        raise CheckpointError(f"{path}: GGUF has no general.architecture")
    family = gguf_family(arch, str(path), gf.metadata)
    names = _rename_all(gf, path, family)
    args = read_args(family.args_from_gguf, gguf_source(gf, arch, family), str(path))
    if family.drops_mtp:  # the multi-token-prediction layers (blk.{n_layer}.*): not read
        names = {g: hf for g, hf in names.items() if not past_trunk(hf, args)}
    pieces = {g: _pieces(gf.tensors[g].shape, hf, family) for g, hf in names.items()}
    validate_shapes(family.expected_shapes(args),
                    {name: shape for parts in pieces.values() for name, shape, _ in parts},
                    str(path))
    if tokenizer is None:
        tokenizer = TextTokenizer.from_gguf_metadata(gf.metadata)
    int4: dict[str, Int4Groups] = {}
    int8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    weights: dict[str, torch.Tensor] = {}
    device = None if device is None else torch.device(device)
    progress = LoadProgress(gf, list(names) if tensors else [], device)
    with _threads(host_threads) if device is None else nullcontext():
        for g, hf0 in (names.items() if tensors else ()):
            whole = _raw_hf_order(gf, g, hf0, args, family, device)
            info = gf.tensors[g]
            for hf, shape, part in pieces[g]:
                raw = whole if part is None else _rows_of_each(whole, info.shape, part)
                groups = int4_groups(raw, info.ggml_type, shape) if keep_int4 else None
                q8 = (q8_0_codes(raw, info.ggml_type, shape) if keep_int4 and hf in Q8_NAMES
                      else None)
                if groups is not None and (_projection(hf) or (hf in Q8_NAMES and q8 is None)):
                    # a Q4_K/Q6_K... embedding or output layer too: build_model keeps it as
                    # codes on the CPU kernels (CodesEmbedding / CodesLinear) or dequantises it
                    int4[hf] = groups
                elif q8 is not None:
                    int8[hf] = q8
                else:
                    weights[hf] = family.from_gguf_weight(
                        hf, dequantize(raw, info.ggml_type, shape, dtype, name=g))
                del raw
            del whole
            gf.release(g)  # its file pages: what was kept is a copy (see GGUFFile.release)
            progress.done(g)
    progress.finish()  # (on a GPU: after the last copy from the pinned buffers)
    gf.close_reader()
    template = gf.get("tokenizer.chat_template")
    return Checkpoint(
        name=model_name(path),
        path=path,
        args=args,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=template if isinstance(template, str) else None,
        context_length=args.max_position_embeddings,
        int4=int4,
        int8=int8,
    )


def _projection(hf: str) -> bool:
    """A linear layer's weight (a Gated DeltaNet's ``in_proj_qkv``/``_z``/``_b``/``_a`` too)."""
    return hf.endswith("_proj.weight") or ".linear_attn.in_proj_" in hf


def _pieces(shape: tuple[int, ...], hf: str, family: Family
            ) -> list[tuple[str, tuple[int, ...], tuple[int, int] | None]]:
    """(HF name, shape, (part, parts) or None) of what one GGUF tensor holds: itself, or for a
    ``Family.gguf_splits`` tensor [E, rows, K] its parts, each every expert's next rows."""
    for fused, parts in family.gguf_splits.items():
        if hf.endswith(f".{fused}.weight") and len(shape) == 3 and shape[1] % len(parts) == 0:
            stem = hf[: -len(f"{fused}.weight")]
            rows = shape[1] // len(parts)
            return [(f"{stem}{p}.weight", (shape[0], rows, shape[2]), (i, len(parts)))
                    for i, p in enumerate(parts)]
    return [(hf, shape, None)]


def _rows_of_each(raw: torch.Tensor, shape: tuple[int, ...], part: tuple[int, int]
                  ) -> torch.Tensor:
    """Part ``i`` of ``n`` of each expert's rows of a 3-D tensor's bytes (rows are whole
    quant blocks)."""
    i, n = part
    experts, rows = shape[0], shape[1]
    per = raw.reshape(experts, rows, -1)
    step = rows // n
    return per[:, i * step:(i + 1) * step].reshape(-1).contiguous()


def _rename_all(gf: GGUFFile, path: Path, family: Family) -> dict[str, str]:
    names: dict[str, str] = {}
    table = family.gguf_names
    for g in gf.tensors:
        if g in table.ignored:
            continue
        hf = table.hf_name(g)
        if hf is None:
            raise CheckpointError(f"{path}: unexpected tensor {g!r} for a {family.name} model")
        names[g] = hf
    return names


def gguf_source(gf: GGUFFile, arch: str, family: Family) -> GGUFSource:
    """What the family reads: metadata, tensor shapes, and its small float tensors decoded."""
    vectors = {}
    for name in family.gguf_names.ignored & set(gf.tensors):
        info = gf.tensors[name]
        values = dequantize(gf.raw(name), info.ggml_type, info.shape, name=name)
        vectors[name] = values.reshape(-1).tolist()
    shapes = {name: info.shape for name, info in gf.tensors.items()}
    return GGUFSource(arch=arch, meta=gf.metadata, shapes=shapes, vectors=vectors)


def _raw_hf_order(gf: GGUFFile, g: str, hf: str, args: ModelArgs, family: Family,
                  device: torch.device | None = None) -> torch.Tensor:
    """The tensor's bytes (on ``device``: copied there), with Q/K rows in HF order."""
    info = gf.tensors[g]
    raw = gf.raw(g) if device is None else gf.raw_to(g, device)
    heads = _qk_heads(hf, args) if family.gguf_names.permute_qk else None
    if heads is not None:
        # rows are whole quant blocks, so un-permute the bytes before dequantising
        rows = info.shape[0]
        raw = unpermute_rows(raw.reshape(rows, -1), heads).reshape(-1)
    return raw


def _qk_heads(hf: str, args: ModelArgs) -> int | None:
    if ".self_attn.q_proj." in hf:
        return args.num_heads
    if ".self_attn.k_proj." in hf:
        return args.num_kv_heads
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation along dim 0 (rows: heads × head_dim).

    llama.cpp stores each head's rows as (head_dim/2, 2) — pairs interleaved; HF
    stores (2, head_dim/2) — the two rotary halves one after the other.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot un-permute {rows} rows into {n_heads} heads")
    rest = w.shape[1:]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(rows, *rest).contiguous())


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Dequantise on ``n`` intra-op threads — one for a CPU server: the per-tensor ops are
    small, and on a busy 2-core machine OpenMP workers spin-waiting for a core made loading
    5-20× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
