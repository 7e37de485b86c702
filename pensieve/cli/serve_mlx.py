"""`pensieve serve --backend mlx` (the default on Apple silicon with pensieve[mlx]): the MLX
engine behind the same engine client, API config and prompt renderer as the torch backend."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pensieve.cli.errors import StartupError
from pensieve.cli.served_model import ServedModel, start_serving
from pensieve.cli.settings import ServeSettings

log = logging.getLogger("pensieve")


def mlx_context(settings: ServeSettings, trained: int) -> int:
    """The context to serve: ``--context-length`` up to the model's trained length (RoPE
    scaling beyond it is not applied on MLX: a clear error instead)."""
    if settings.rope_scale is not None and settings.rope_scale != 1:
        raise StartupError("--rope-scale is not supported by the MLX backend; "
                           "use --backend torch to extend the context")
    requested = settings.context_length
    if requested is not None and requested > trained:
        raise StartupError(f"--context-length {requested} exceeds the model's trained {trained}: "
                           "the MLX backend does not scale RoPE (use --backend torch)")
    return requested or trained


def load_mlx_served_model(settings: ServeSettings,
                          api_config: Callable[..., Any] | None = None) -> ServedModel:
    """Load ``settings.model_path`` (an MLX folder, or a GGUF converted once) and start its
    engine; the KV pool keeps the model's own activation type and the ``kv_cache_bytes``
    budget."""
    from pensieve.backends.mlx_backend import load_mlx_model, mlx_engine
    from pensieve.chat.prompt import PromptRenderer
    from pensieve.loaders.checkpoint import CheckpointError

    started = time.perf_counter()
    try:
        loaded = load_mlx_model(settings.model_path)
    except (CheckpointError, ValueError) as exc:
        raise StartupError(str(exc)) from exc
    context = mlx_context(settings, loaded.context_length)
    engine_cfg = replace(settings.engine, device="cpu", kv_dtype=None, context_length=context,
                         async_scheduling=False)
    try:
        engine = mlx_engine(loaded, engine_cfg)
    except ValueError as exc:  # an architecture whose layers are not all key/value attention
        raise StartupError(f"{loaded.path}: {exc}") from exc
    log.info("MLX model %s loaded from %s [%.2f s]; context %d tokens, KV pool up to %d blocks",
             loaded.name, loaded.path, time.perf_counter() - started, context,
             engine.runner.num_blocks)
    client, api_cfg = start_serving(engine, settings, settings.served_name or loaded.name, context,
                                    engine_cfg.max_waiting, api_config)
    return ServedModel(client, api_cfg, PromptRenderer(loaded.tokenizer, loaded.chat_template))
