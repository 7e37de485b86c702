"""``pensieve serve --config FILE``: several models, routed by name (TOML).

::

    idle_unload_s = 600          # unload a model idle this long (0: never); default 900
    memory_budget_gb = 12        # what loaded models may take together; default 80% of RAM

    [[models]]
    name = "main"                # the id it is served under
    model = "qwen2.5-coder:1.5b" # a path (GGUF file / HF folder) or a store name (pensieve pull)
    aliases = ["coder"]
    context_length = 16384       # backend options, as the serve flags of the same names
    weights = "auto"
    max_num_seqs = 8
    kv_cache_gb = 1.0
    default_temperature = 0.2
    preload = true               # loaded at start (default: the first model only)

    [[models]]
    name = "small"
    model = "/models/smollm2.gguf"

    [routes]                     # glob → model name; first match wins, in file order
    "claude-haiku-*" = "small"
    "claude-sonnet-*" = "main"
    "claude-opus-*" = "main"

A request names a model by its name, an alias, or anything a route matches; other names are
404 ``not_found_error``. Parsed once into frozen dataclasses; every mistake is a ``ValueError``
that names the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_IDLE_UNLOAD_S = 900.0
DEFAULT_BUDGET_FRACTION = 0.8  # of physical memory, when the file sets no budget
_MODEL_KEYS = {"name", "model", "aliases", "context_length", "weights", "max_num_seqs", "kv_cache_gb",
               "default_temperature", "preload"}
_TOP_KEYS = {"idle_unload_s", "memory_budget_gb", "models", "routes"}
WEIGHT_CHOICES = ("auto", "float", "int4")


@dataclass(frozen=True)
class ModelEntry:
    """One model of the file: where it comes from and how to run it."""

    name: str
    source: str  # path or store name
    aliases: tuple[str, ...] = ()
    context_length: int | None = None
    weights: str | None = None
    max_num_seqs: int | None = None
    kv_cache_bytes: int | None = None
    default_temperature: float | None = None
    preload: bool = False


@dataclass(frozen=True)
class ServeConfigFile:
    models: tuple[ModelEntry, ...]
    routes: tuple[tuple[str, str], ...]  # (glob, model name), in file order
    idle_unload_s: float | None  # None: never unload
    memory_budget_bytes: int | None  # None: 80% of physical memory

    @property
    def primary(self) -> ModelEntry:
        return self.models[0]


def load_config_file(path: str | Path) -> ServeConfigFile:
    """Read and check ``path``; ``ValueError`` naming the file and the key on any mistake."""
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {exc}") from None
    try:
        return parse_config(raw, base=path.parent)
    except ValueError as exc:
        raise ValueError(f"--config {path}: {exc}") from None


def parse_config(raw: dict[str, Any], base: Path = Path(".")) -> ServeConfigFile:
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (known: {sorted(_TOP_KEYS)})")
    items = raw.get("models")
    if not isinstance(items, list) or not items:
        raise ValueError("at least one [[models]] entry is required")
    models = tuple(_model(item, i, base) for i, item in enumerate(items))
    if not any(m.preload for m in models):
        models = (_with_preload(models[0]),) + models[1:]
    names: dict[str, str] = {}
    for m in models:
        for name in (m.name, *m.aliases):
            if name in names:
                raise ValueError(f"the name {name!r} is used twice ({names[name]} and {m.name})")
            names[name] = m.name
    routes = raw.get("routes", {})
    if not isinstance(routes, dict):
        raise ValueError("[routes] must be a table of \"glob\" = \"model name\"")
    for pattern, target in routes.items():
        if target not in names:
            raise ValueError(f"routes.{pattern!r} names {target!r}, which is no model's name or alias")
    idle = _number(raw, "idle_unload_s", DEFAULT_IDLE_UNLOAD_S)
    budget = raw.get("memory_budget_gb")
    return ServeConfigFile(
        models=models,
        routes=tuple((p, names[t]) for p, t in routes.items()),
        idle_unload_s=idle or None,
        memory_budget_bytes=None if budget is None else int(_number(raw, "memory_budget_gb", 0) * 2**30),
    )


def _with_preload(entry: ModelEntry) -> ModelEntry:
    return ModelEntry(**{**entry.__dict__, "preload": True})


def _model(item: Any, index: int, base: Path) -> ModelEntry:
    where = f"models[{index}]"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be a table")
    unknown = set(item) - _MODEL_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_MODEL_KEYS)})")
    source = item.get("model")
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}.model: a path or store name is required")
    if source.startswith(("./", "../")):
        source = str((base / source).resolve())  # relative to the file
    name = item.get("name") or Path(source).stem
    aliases = item.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ValueError(f"{where}.aliases must be a list of names")
    weights = item.get("weights")
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(f"{where}.weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    kv_gb = item.get("kv_cache_gb")
    return ModelEntry(
        name=str(name), source=source, aliases=tuple(aliases),
        context_length=_int(item, "context_length", where, minimum=16),
        weights=weights,
        max_num_seqs=_int(item, "max_num_seqs", where, minimum=1),
        kv_cache_bytes=None if kv_gb is None else int(_number(item, "kv_cache_gb", 0, where) * 2**30),
        default_temperature=None if item.get("default_temperature") is None
        else _number(item, "default_temperature", 0, where),
        preload=bool(item.get("preload", False)),
    )


def _int(table: dict[str, Any], key: str, where: str, minimum: int) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}.{key} must be an integer ≥ {minimum}, got {value!r}")
    return value


def _number(table: dict[str, Any], key: str, default: float, where: str = "") -> float:
    value = table.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where + '.' if where else ''}{key} must be a number ≥ 0, got {value!r}")
    return float(value)
