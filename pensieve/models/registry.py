"""One table of model families; lookups by registry name, GGUF architecture, HF model_type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pensieve.models import (
    deepseek_v3, gemma3, gemma4, glm4_moe, glm4_moe_lite, gpt_oss, llama, mistral, mixtral,
    phi3, qwen2, qwen2_moe, qwen3, qwen3_5, qwen3_moe, qwen3_next,
)
from pensieve.models.args import ModelArgs
from pensieve.models.family import Family

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, mistral.FAMILY, phi3.FAMILY,
                        gemma3.FAMILY, qwen3_moe.FAMILY, qwen2_moe.FAMILY, mixtral.FAMILY,
                        glm4_moe.FAMILY, glm4_moe_lite.FAMILY, deepseek_v3.FAMILY, gemma4.FAMILY,
                        qwen3_next.FAMILY, qwen3_5.FAMILY, qwen3_5.MOE_FAMILY, gpt_oss.FAMILY)
}


class UnsupportedArchitectureError(ValueError):
    pass


def _supported(attr: str) -> str:
    return ", ".join(sorted(n for f in FAMILIES.values() for n in getattr(f, attr)))


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {name!r} (supported: {', '.join(sorted(FAMILIES))})"
        ) from None


def family_for_gguf(architecture: str, metadata: Mapping[str, Any] | None = None) -> Family:
    """The family whose GGUF ``general.architecture`` is ``architecture`` and that claims a
    file with this ``metadata`` (Mixtral and Llama share ``llama``)."""
    for f in FAMILIES.values():
        if architecture in f.gguf_architectures and f.gguf_match(metadata or {}, architecture):
            return f
    raise UnsupportedArchitectureError(
        f"unsupported GGUF architecture {architecture!r}; supported: {_supported('gguf_architectures')}"
    )


def family_for_hf(model_type: str) -> Family:
    """The family whose HF ``config.json`` ``model_type`` is ``model_type``."""
    for f in FAMILIES.values():
        if model_type in f.hf_model_types:
            return f
    raise UnsupportedArchitectureError(
        f"unsupported model_type {model_type!r} in config.json; "
        f"supported: {_supported('hf_model_types')}"
    )


def model_class(args: ModelArgs) -> type[nn.Module]:
    return family(args.architecture).model
