"""Load a Hugging Face model folder (config.json + *.safetensors + tokenizer.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pensieve.loaders import hf_experts
from pensieve.loaders.architectures import hf_family, read_args, validate_shapes
from pensieve.loaders.checkpoint import Checkpoint, CheckpointError
from pensieve.loaders.tokenizer import TextTokenizer
from pensieve.models.family import past_trunk

INDEX_FILE = "model.safetensors.index.json"
# buffers some exporters save alongside the weights; recomputed by the model
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: malformed JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def load_hf_folder(path: str | Path, dtype: torch.dtype = torch.float32, *,
                   keep_int4: bool = False) -> Checkpoint:
    """Read an HF folder; CheckpointError if it is unsupported, incomplete or damaged.
    ``keep_int4``: MXFP4 experts (gpt-oss) go to ``Checkpoint.int4`` as exact int8 codes
    (``hf_experts.expert_codes``), as a GGUF's quantised weights do."""
    path = Path(path)
    config = _read_json(path / "config.json")
    family = hf_family(str(config.get("model_type")), str(path))
    args = read_args(family.args_from_hf, config, str(path / "config.json"))
    files = weight_files(path)
    file_shapes = _tensor_shapes(files, args.tie_word_embeddings)
    if family.drops_mtp:  # the multi-token-prediction layers: not read
        file_shapes = {n: s for n, s in file_shapes.items() if not past_trunk(n, args)}
    sources, shapes = hf_experts.plan(file_shapes, family.hf_renames, family.hf_expert_layout)
    validate_shapes(family.expected_shapes(args), shapes, str(path))
    wanted = {n for src in sources.values() for n in src.names}
    codes: dict[str, Any] | None = {} if keep_int4 else None
    weights = {name: family.from_hf_weight(name, w.to(dtype)) for name, w in
               hf_experts.assemble(_read_weights(files, wanted, dtype), sources, codes).items()}
    try:
        tokenizer = TextTokenizer.from_tokenizer_json(path)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from exc
    return Checkpoint(
        name=path.resolve().name,
        path=path,
        args=args,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=read_chat_template(path),
        context_length=args.max_position_embeddings,
        int4=codes or {},
    )


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files: from the shard index, else every *.safetensors."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {INDEX_FILE} missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pth")):
            raise CheckpointError(
                f"{path}: only pickle weights (.bin/.pth); convert them to safetensors"
            )
        raise CheckpointError(f"{path}: no *.safetensors weights")
    return files


def _open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: truncated or malformed safetensors file ({exc})") from exc


def _read_weights(
    files: list[Path], wanted: set[str], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with _open(file) as st:
            try:
                for name in st.keys():
                    if name in wanted:  # integer tensors (MXFP4 codes) as stored
                        t = st.get_tensor(name)
                        weights[name] = t.to(dtype) if t.is_floating_point() else t
            except SafetensorError as exc:
                raise CheckpointError(f"{file}: unreadable tensor data ({exc})") from exc
    return weights


def _tensor_shapes(files: list[Path], tied: bool) -> dict[str, tuple[int, ...]]:
    """Name → shape of every weight the model uses (read from headers, no data)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with _open(file) as st:
            for name in st.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return shapes


def read_chat_template(path: Path) -> str | None:
    """The default chat template: chat_template.jinja, tokenizer_config.json, chat_template.json."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        if (path / name).is_file():
            template = _read_json(path / name).get("chat_template")
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default") or next(iter(named.values()), None)
            if isinstance(template, str):
                return template
    return None
