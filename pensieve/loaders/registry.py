"""One entry point for every model source: a ``.gguf`` file or a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from pensieve.loaders.checkpoint import Checkpoint, CheckpointError
from pensieve.loaders.gguf import load_gguf
from pensieve.loaders.safetensors import load_hf_folder
from pensieve.loaders.tokenizer import TextTokenizer

GGUF_MAGIC = b"GGUF"


def checkpoint_format(path: Path) -> str:
    """``"gguf"`` or ``"hf"`` for a loadable path; CheckpointError otherwise."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise CheckpointError(f"{path}: folder has no config.json, not a Hugging Face model{hint}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        return "gguf"
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic bytes {magic!r})")
    raise CheckpointError(
        f"{path}: unknown model format; expected a .gguf file or a folder with config.json"
    )


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, *, keep_int4: bool = False,
    tensors: bool = True, tokenizer: TextTokenizer | None = None,
    device: str | torch.device | None = None, host_threads: int = 1,
) -> Checkpoint:
    """Load ``path`` with weights in HF names, dequantised/cast to ``dtype``.

    Raises CheckpointError with the reason for a missing path, an unknown format, an
    unsupported architecture or quant type, or a truncated/malformed file. ``tensors=False``
    (GGUF only): everything but the weights, which come from a packed copy, as may the
    ``tokenizer``. ``device``, ``host_threads`` (GGUF only): where and on how many host
    threads the tensors are decoded (``load_gguf``).
    """
    path = Path(path).expanduser()
    if checkpoint_format(path) == "gguf":
        return load_gguf(path, dtype, keep_int4=keep_int4, tensors=tensors,
                         tokenizer=tokenizer, device=device, host_threads=host_threads)
    return load_hf_folder(path, dtype, keep_int4=keep_int4)
