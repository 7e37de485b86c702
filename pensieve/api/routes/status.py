"""``GET /v1/status`` (what the server is doing, as JSON) and ``GET /ui`` (a live page that
polls it: models, running requests and their progress, cache hit rate, throughput chart).

The page is one static HTML file with inline JS (``api/static/status.html``): no build step.
With API keys configured, ``/v1/status`` wants one like every API route; the page sends the
key given in its URL fragment (``/ui#key=…``), which never reaches server logs.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse

from pensieve.api.auth import require_api_key
from pensieve.api.routes.metrics import metrics_of
from pensieve.api.state import services_of

router = APIRouter()


def models_status(request: Request) -> list[dict[str, Any]]:
    """The models this server answers for: the pool's (loaded or not) or the one served."""
    pool = getattr(request.app.state, "pool", None)
    if pool is not None:
        rows: list[dict[str, Any]] = pool.status()
        return rows
    config = services_of(request).config
    return [{"id": config.model_id, "loaded": True, "context_length": config.context_length,
             "aliases": sorted(config.model_aliases)}]


@router.get("/v1/status", dependencies=[Depends(require_api_key)])
async def status(request: Request) -> JSONResponse:
    body = metrics_of(request).status()
    body["models"] = models_status(request)
    return JSONResponse(body)


@router.get("/ui")
async def page() -> HTMLResponse:
    html = resources.files("pensieve.api").joinpath("static/status.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"cache-control": "no-cache"})
