"""One model ready to serve, whatever loaded it: its running engine client, the API's config
for it and its prompt renderer (``load_served_model``: the backend's load, then
``start_serving``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pensieve.cli.settings import ServeSettings


@dataclass
class ServedModel:
    """One model ready to serve: its running engine client, API config and renderer.
    ``after_ready`` writes its packed-weights copy on first start (off the ready path)."""

    client: Any
    config: Any  # api.config.ApiConfig
    renderer: Any  # chat.prompt.PromptRenderer
    write_cache: Callable[[], None] | None = None

    def after_ready(self) -> None:
        if self.write_cache is not None:
            self.write_cache()
            self.write_cache = None


def load_served_model(settings: ServeSettings, api_config: Callable[..., Any] | None = None) -> ServedModel:
    """Load ``settings.model_path`` and start its engine; ``api_config`` builds its
    ``ApiConfig`` from the keyword arguments (default: ``ApiConfig`` itself)."""
    from pensieve.chat.prompt import PromptRenderer

    if settings.backend == "mlx":
        from pensieve.cli.serve_mlx import load_mlx_served_model

        return load_mlx_served_model(settings, api_config)
    from pensieve.cli.serve_torch import load_torch_engine

    engine, ckpt, write_cache = load_torch_engine(settings)
    client, api_cfg = start_serving(engine, settings, settings.served_name or ckpt.name,
                                    engine.config.context_length, engine.config.max_waiting,
                                    api_config)
    renderer = PromptRenderer(ckpt.tokenizer, ckpt.chat_template)
    return ServedModel(client, api_cfg, renderer, write_cache)


def start_serving(engine, settings: ServeSettings, name: str, context_length: int,  # noqa: ANN001
                  max_waiting: int, api_config: Callable[..., Any] | None) -> tuple[Any, Any]:
    """A loaded engine (any backend) → its running ``EngineClient`` and the API's config."""
    from pensieve.api.config import ApiConfig
    from pensieve.engine.client import EngineClient

    # the vocabulary's grammar tables, built off the first tool request: xgrammar (which
    # imports transformers, ~1.5 s) is imported on a thread a moment after the server is up
    prepare = threading.Timer(GRAMMAR_PREPARE_DELAY_S, _prepare_grammars, args=(engine,))
    prepare.daemon = True
    prepare.start()
    client = EngineClient(engine, name, max_waiting=max_waiting)
    client.start()
    api_cfg = (api_config or ApiConfig)(
        api_keys=settings.api_keys,
        model_id=name,
        model_aliases=settings.aliases,
        context_length=context_length,
        default_temperature=settings.default_temperature,
        default_top_p=settings.default_top_p,
        default_top_k=settings.default_top_k,
        dry=settings.dry,
        request_timeout_s=settings.request_timeout_s,
    )
    return client, api_cfg


GRAMMAR_PREPARE_DELAY_S = 1.0  # after build_app: uvicorn's start is not slowed by the import


def _prepare_grammars(engine) -> None:  # noqa: ANN001
    from pensieve.engine.grammar import grammar_available

    if grammar_available(server=True):  # xgrammar imported without transformers
        # building them (xgrammar's import, the vocabulary's tables) leaves ~30 MB of freed
        # heap resident (152k tokens) until something trims it: trimmed when done, so the
        # first prefill's peak does not hold it
        engine.grammars.prepare().add_done_callback(lambda _job: _settle_memory(engine))
    else:
        _settle_memory(engine)


def _settle_memory(engine) -> None:  # noqa: ANN001
    """Start-up is over: malloc's free pages back; on a CPU server also the shared libraries'
    pages only start-up touched (``backends/cpu_memory.py``)."""
    from pensieve.backends.cpu_memory import drop_library_pages, release_free_memory

    release_free_memory()
    if str(getattr(getattr(engine, "config", None), "device", "")).split(":")[0] == "cpu":
        drop_library_pages()
