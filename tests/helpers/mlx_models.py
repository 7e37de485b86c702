"""The default SmolLM2 model converted to MLX once (cached under ~/.cache/pensieve/mlx, keyed by
the GGUF and the conversion), for the MLX backend's tests."""

from __future__ import annotations

from pathlib import Path

from pensieve.backends.mlx_backend import MLX_CACHE
from pensieve.backends.mlx_convert import cached_conversion
from pensieve.loaders.default_model import default_model_path


def default_mlx(dtype: str = "bfloat16") -> Path:
    """SmolLM2-135M-Instruct as an MLX folder without quantisation, in ``dtype`` (mlx[cpu]'s
    4-bit matmuls are far too slow on Linux for the test suite; 4-bit conversion is tested on a
    tiny model)."""
    return cached_conversion(default_model_path(), MLX_CACHE, q_bits=0, dtype=dtype)
