"""Which model families the loaders accept, and the weights each one must provide.

One table (``ARCHITECTURES``) keyed on our registry name. Adding a family that shares
Llama's weight layout (qwen2, mistral …) is one more ``ArchitectureSpec`` row: the GGUF
``general.architecture`` value, the HF ``model_type`` values, and whether llama.cpp's
converter permuted the Q/K rows for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.models.args import ModelArgs


@dataclass(frozen=True)
class ArchitectureSpec:
    """One supported model family.

    ``permute_qk``: llama.cpp's ``convert_hf_to_gguf.py`` interleaves the rotary halves
    of Q/K rows for this family, so the GGUF loader must undo it.
    """

    name: str
    gguf_names: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    permute_qk: bool


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(
        name="llama", gguf_names=("llama",), hf_model_types=("llama",), permute_qk=True
    ),
}


def _supported(attr: str) -> str:
    return ", ".join(sorted(n for spec in ARCHITECTURES.values() for n in getattr(spec, attr)))


def spec_for_gguf(architecture: str) -> ArchitectureSpec:
    """The spec whose GGUF ``general.architecture`` is ``architecture``."""
    for spec in ARCHITECTURES.values():
        if architecture in spec.gguf_names:
            return spec
    raise CheckpointError(
        f"unsupported GGUF architecture {architecture!r}; supported: {_supported('gguf_names')}"
    )


def spec_for_hf(model_type: str) -> ArchitectureSpec:
    """The spec whose HF ``config.json`` ``model_type`` is ``model_type``."""
    for spec in ARCHITECTURES.values():
        if model_type in spec.hf_model_types:
            return spec
    raise CheckpointError(
        f"unsupported model_type {model_type!r} in config.json; "
        f"supported: {_supported('hf_model_types')}"
    )


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight a Llama-layout model needs, in HF names, with its torch shape."""
    h, hd = args.hidden_size, args.head_dim
    q_rows, kv_rows = args.num_heads * hd, args.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (args.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_rows, h),
            p + "self_attn.k_proj.weight": (kv_rows, h),
            p + "self_attn.v_proj.weight": (kv_rows, h),
            p + "self_attn.o_proj.weight": (h, q_rows),
            p + "mlp.gate_proj.weight": (args.intermediate_size, h),
            p + "mlp.up_proj.weight": (args.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, args.intermediate_size),
        })
        if args.attention_bias:
            shapes.update({
                p + "self_attn.q_proj.bias": (q_rows,),
                p + "self_attn.k_proj.bias": (kv_rows,),
                p + "self_attn.v_proj.bias": (kv_rows,),
            })
        if args.mlp_bias:
            for name, rows in (("gate_proj", args.intermediate_size),
                               ("up_proj", args.intermediate_size), ("down_proj", h)):
                shapes[p + f"mlp.{name}.bias"] = (rows,)
    return shapes


def validate_shapes(args: ModelArgs, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected or mis-shaped weights.

    ``shapes`` maps HF weight names to torch shapes, so a loader can check a file's
    tensor table before paying for reading and dequantising it.
    """
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(
        n for n in set(shapes) - set(expected)
        # o_proj bias appears in some attention_bias checkpoints; the model may use it
        if not n.endswith("self_attn.o_proj.bias")
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weight(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} weight(s), e.g. {unexpected[:3]}")
    for name, shape in expected.items():
        if name in shapes and tuple(shapes[name]) != shape:
            problems.append(f"{name} has shape {tuple(shapes[name])}, expected {shape}")
            break
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
