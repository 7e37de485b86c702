"""The FastAPI application: routes, error envelope, request ids."""

from __future__ import annotations

from fastapi import FastAPI

from pensieve.api.config import ApiConfig
from pensieve.api.errors import install_error_handlers
from pensieve.api.middleware import RequestIdMiddleware
from pensieve.api.routes import health, messages, models
from pensieve.api.state import GenerationClient, Services
from pensieve.chat import PromptRenderer


def create_app(config: ApiConfig, engine: GenerationClient, renderer: PromptRenderer) -> FastAPI:
    """An app serving ``engine`` under the Anthropic Messages API.

    The engine's lifecycle (start, shutdown) belongs to the caller.
    """
    app = FastAPI(title="Pensieve", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # POST /v1/messages/ is a 404 (as the API's), not a 307
    app.state.services = Services(config=config, engine=engine, renderer=renderer)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(messages.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app
