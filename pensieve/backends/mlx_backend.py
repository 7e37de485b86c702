"""Build the MLX engine: an mlx-lm model from an MLX folder (or a GGUF, converted once and
cached), Pensieve's tokenizer and chat template from the same folder, the MLX runner composed
with the same ``Engine`` as the PyTorch backend."""

from __future__ import annotations

import importlib.util
import logging
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pensieve.engine.config import EngineConfig
from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.safetensors import read_chat_template
from pensieve.loaders.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from pensieve.engine.engine import Engine

log = logging.getLogger(__name__)

MLX_CACHE = Path("~/.cache/pensieve/mlx").expanduser()  # GGUFs converted for the MLX backend


def mlx_available() -> bool:
    """Whether mlx and mlx-lm are installed (``pip install "pensieve[mlx]"``)."""
    return all(importlib.util.find_spec(m) is not None for m in ("mlx", "mlx_lm"))


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


@dataclass
class MlxModel:
    """What the MLX backend serves: the mlx-lm module and Pensieve's view of its folder."""

    name: str
    path: Path  # the MLX folder
    model: Any  # an mlx-lm ``Model``
    config: dict[str, Any]  # its config.json
    tokenizer: TextTokenizer
    chat_template: str | None
    context_length: int
    vocab_size: int
    kv_elements_per_token: int  # keys and values of every layer for one token
    activation_itemsize: int  # bytes per element of its activations (and so of its KV)


def mlx_folder(path: Path) -> Path:
    """``path`` as an MLX folder: a folder as it is; a GGUF converted once (4-bit) and cached."""
    from pensieve.backends.mlx_convert import cached_conversion
    from pensieve.loaders.registry import checkpoint_format

    if checkpoint_format(path) == "hf":
        return path
    log.info("%s: converting to MLX (4-bit) once, cached under %s", path.name, MLX_CACHE)
    return cached_conversion(path, MLX_CACHE, q_bits=4)


def activation_itemsize(model: Any) -> int:
    """Bytes per element of the model's activations (what its KV holds): its norms' type,
    which stays float in a quantised model; 2 if it has none."""
    from mlx.utils import tree_flatten

    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            return value.dtype.size
    return 2


def load_mlx_model(path: str | Path) -> MlxModel:
    """Load an MLX folder (or a GGUF, converted); CheckpointError with the reason if it fails."""
    from mlx_lm.utils import load_model

    from pensieve.loaders.gguf import model_name as gguf_name

    source = Path(path).expanduser()
    folder = mlx_folder(source)
    try:
        model, config = load_model(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{folder}: mlx-lm cannot load it ({exc})") from exc
    try:
        tokenizer = TextTokenizer.from_tokenizer_json(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot load tokenizer ({exc})") from exc
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    layers = len(model.layers)
    name = gguf_name(source) if source.is_file() else source.resolve().name
    return MlxModel(
        name=name, path=folder, model=model, config=config, tokenizer=tokenizer,
        chat_template=read_chat_template(folder),
        context_length=int(text.get("max_position_embeddings") or 4096),
        vocab_size=int(text["vocab_size"]),
        kv_elements_per_token=2 * layers * kv_heads * head_dim,
        activation_itemsize=activation_itemsize(model),
    )


def mlx_engine(loaded: MlxModel, config: EngineConfig) -> Engine:
    """The engine over an MLX model: the MLX runner composed with the shared ``Engine``; its
    KV pool in ``config.kv_dtype``, or the model's activation type where that is None."""
    from pensieve.backends.mlx_runner import MlxRunner
    from pensieve.engine.engine import Engine

    itemsize = config.kv_dtype.itemsize if config.kv_dtype is not None else loaded.activation_itemsize
    runner = MlxRunner(loaded.model, config, loaded.kv_elements_per_token * itemsize,
                       loaded.vocab_size)
    return Engine(runner, loaded.tokenizer, config, loaded.vocab_size)

