"""`pensieve serve --config FILE`: the model pool (``api/model_pool.py``) over the models the
file lists, each with its own settings (the serve flags, overridden per model), loaded by the
same code as a single model (``served_model.load_served_model``)."""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pensieve.cli.config_file import DEFAULT_BUDGET_FRACTION, ModelEntry, ServeConfigFile
from pensieve.cli.served_model import load_served_model
from pensieve.cli.settings import ServeSettings, settings_from_args

log = logging.getLogger("pensieve")


def model_settings(ns: argparse.Namespace, env: Mapping[str, str], entry: ModelEntry) -> ServeSettings:
    """The serve settings of one model: the command line's, with the entry's overrides (its
    source goes through ``--model``'s own resolution: a path or a store name, with its sampling
    defaults)."""
    own = copy.copy(ns)
    own.model = entry.source
    own.served_name = entry.name
    own.alias = []
    for key in ("context_length", "weights", "max_num_seqs", "default_temperature"):
        value = getattr(entry, key)
        if value is not None:
            setattr(own, key, value)
    settings = settings_from_args(own, env)
    if entry.kv_cache_bytes is not None:
        settings = replace(settings, engine=replace(settings.engine, kv_cache_bytes=entry.kv_cache_bytes))
    return settings


def estimate_bytes(settings: ServeSettings) -> int:
    """What loading the model is expected to take: its files plus its KV cache's cap."""
    path = Path(settings.model_path).expanduser()
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf", ".bin"))
    elif path.exists():
        size = path.stat().st_size
    else:
        size = 0
    return size + settings.engine.host_kv_bytes


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class PoolClient:
    """What ``serve_http`` drives (drain, shutdown, death) over every loaded model."""

    def __init__(self, pool: Any, primary: Any) -> None:
        self.pool = pool
        self.primary = primary

    @property
    def dead_reason(self) -> str | None:
        return self.primary.dead_reason

    @property
    def drained(self) -> bool:
        return self.primary.drained

    @property
    def on_death(self) -> Any:
        return self.primary.on_death

    @on_death.setter
    def on_death(self, callback: Any) -> None:
        self.primary.on_death = callback

    def drain(self, reason: str) -> None:
        for model in list(self.pool.loaded.values()):
            model.client.drain(reason)

    def shutdown(self) -> None:
        self.pool.shutdown()


def _unload(model: Any) -> None:
    from pensieve.backends.cpu_memory import release_free_memory

    model.client.shutdown()
    del model
    gc.collect()
    release_free_memory()


def build_pool_app(ns: argparse.Namespace, env: Mapping[str, str], config: ServeConfigFile,
                   settings: ServeSettings):  # noqa: ANN201 - (FastAPI, PoolClient)
    from pensieve.api.app import create_app
    from pensieve.api.model_pool import LoadedModel, ModelPool, PoolEntry, RoutedApiConfig
    from pensieve.api.state import Services

    per_model = {m.name: model_settings(ns, env, m) for m in config.models}
    entries = [PoolEntry(m.name, m.aliases, estimate_bytes(per_model[m.name]), m.context_length)
               for m in config.models]
    budget = config.memory_budget_bytes or int(physical_memory_bytes() * DEFAULT_BUDGET_FRACTION) or None

    def load(model_id: str) -> LoadedModel:
        served = load_served_model(per_model[model_id], api_config=partial(RoutedApiConfig, router=pool.resolve))
        served.after_ready()
        return LoadedModel(Services(served.config, served.client, served.renderer), served.client)

    pool = ModelPool(entries, config.routes, load, budget_bytes=budget, idle_unload_s=config.idle_unload_s,
                     unload=_unload, pinned=frozenset({config.primary.name}))
    for entry in config.models:
        if entry.preload:
            pool.add_loaded(entry.name, load(entry.name))
    log.info("models: %s; routes: %s; memory budget %.1f GiB", ", ".join(e.id for e in entries),
             ", ".join(f"{p} → {t}" for p, t in config.routes) or "none", (budget or 0) / 2**30)
    primary = pool.loaded[config.primary.name]
    app = create_app(primary.services.config, primary.client, primary.services.renderer, settings.batches,
                     pool=pool)
    return app, PoolClient(pool, primary.client)
