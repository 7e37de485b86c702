"""One table: architecture name → model class."""

from __future__ import annotations

from torch import nn

from pensieve.models.args import ModelArgs
from pensieve.models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    pass


def model_class(args: ModelArgs) -> type[nn.Module]:
    try:
        return MODELS[args.architecture]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise UnsupportedArchitectureError(
            f"unsupported architecture {args.architecture!r} (supported: {known})"
        ) from None
