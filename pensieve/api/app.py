"""The FastAPI application: routes, error envelope, request ids."""

from __future__ import annotations

import logging
import secrets
import tempfile
from pathlib import Path

from fastapi import FastAPI

from pensieve.api.batches import BatchConfig
from pensieve.api.config import ApiConfig
from pensieve.api.errors import install_error_handlers
from pensieve.api.metrics import MetricsMiddleware, ServerMetrics
from pensieve.api.middleware import RequestIdMiddleware
from pensieve.api.model_pool import ModelPool
from pensieve.api.routes import health, messages, metrics, models, openai_chat, openai_completions, status
from pensieve.api.routes.batches import install_batches
from pensieve.api.state import GenerationClient, Services
from pensieve.chat import PromptRenderer


def create_app(config: ApiConfig, engine: GenerationClient, renderer: PromptRenderer,
               batches: BatchConfig | None = None, pool: ModelPool | None = None) -> FastAPI:
    """An app serving ``engine`` under the Anthropic Messages API.

    The engine's lifecycle (start, shutdown) belongs to the caller; the Message Batches runner's
    is the app's lifespan. Without ``batches`` they are kept in a temporary folder.
    """
    if batches is None:
        folder = Path(tempfile.gettempdir()) / f"pensieve-batches-{secrets.token_hex(6)}"  # made on first use
        batches = BatchConfig(directory=folder)
        logging.getLogger(__name__).debug("message batches kept in %s (not persisted)", batches.directory)
    app = FastAPI(title="Pensieve", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # POST /v1/messages/ is a 404 (as the API's), not a 307
    app.state.services = Services(config=config, engine=engine, renderer=renderer)
    app.router.lifespan_context = install_batches(app, app.state.services, batches).lifespan
    app.state.pool = pool  # several models (pensieve serve --config); ``engine`` is its first
    app.state.metrics = ServerMetrics(pool.snapshots if pool is not None
                                      else lambda: {config.model_id: _snapshot(engine)})
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(messages.router)
    app.include_router(models.router)
    app.include_router(openai_chat.router)
    app.include_router(openai_completions.router)
    app.include_router(metrics.router)
    app.include_router(status.router)
    app.include_router(health.router)
    return app


def _snapshot(engine: object) -> object:
    """The engine client's counters, where it keeps any (the upstream backend does not)."""
    snapshot = getattr(engine, "snapshot", None)
    return snapshot() if snapshot is not None else None
