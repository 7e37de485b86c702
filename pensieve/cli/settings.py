"""Flags + environment → one frozen settings object, validated once."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pensieve.engine.config import EngineConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServeSettings:
    model_path: Path
    host: str
    port: int
    api_keys: tuple[str, ...]
    served_name: str | None
    aliases: Mapping[str, str]
    engine: EngineConfig
    context_length: int | None  # None → the model's own
    threads: int | None = None

    def engine_for(self, model_context: int) -> EngineConfig:
        ctx = self.context_length or model_context
        return replace(self.engine, context_length=ctx)


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str]) -> ServeSettings:
    from pensieve.loaders.default_model import default_model_path

    model = Path(ns.model).expanduser() if ns.model else default_model_path()
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = ns.dtype or ("bfloat16" if device == "cuda" else "float32")
    keys = tuple(ns.api_key) + tuple(k for k in env.get("PENSIEVE_API_KEY", "").split(",") if k)
    aliases = {}
    for item in ns.alias:
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--alias wants NAME=MODEL, got {item!r}")
        aliases[name] = target
    engine = EngineConfig(
        device=device,
        dtype=DTYPES[dtype_name],
        max_num_seqs=ns.max_num_seqs or 8,
        max_num_batched_tokens=2048 if device == "cuda" else 512,
    )
    if ns.context_length is not None and ns.context_length < 16:
        raise ValueError("--context-length must be at least 16")
    return ServeSettings(
        model_path=model, host=ns.host, port=ns.port, api_keys=keys, served_name=ns.served_name,
        aliases=aliases, engine=engine, context_length=ns.context_length, threads=ns.threads,
    )
