"""A loader's view of the model families: find one by GGUF/HF name, check a file's weights.

The families themselves (configs, names, modules, fast paths) live in ``models/<family>.py``
and ``models/registry.py``; this module turns their errors into ``CheckpointError`` naming
the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.models.family import Family, ModelConfigError
from pensieve.models.registry import UnsupportedArchitectureError, family_for_gguf, family_for_hf

T = TypeVar("T")


def gguf_family(architecture: str, source: str, metadata: Mapping[str, Any] | None = None
                ) -> Family:
    try:
        return family_for_gguf(architecture, metadata)
    except UnsupportedArchitectureError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def hf_family(model_type: str, source: str) -> Family:
    try:
        return family_for_hf(model_type)
    except UnsupportedArchitectureError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def read_args(parse: Callable[[Any], T], value: Any, source: str) -> T:
    """``parse(value)`` with a family's config errors as ``CheckpointError`` naming ``source``."""
    try:
        return parse(value)
    except ModelConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def validate_shapes(expected: Mapping[str, tuple[int, ...]],
                    shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise ``CheckpointError`` naming missing, unexpected or mis-shaped weights.

    ``shapes`` maps HF weight names to torch shapes, so a loader can check a file's
    tensor table before paying for reading and dequantising it.
    """
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
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
