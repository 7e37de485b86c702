"""``GET /health`` and ``/`` (Claude Code sends ``HEAD /`` first): no auth.

``/health`` answers 503 with the reason once the engine loop has died (the process is
about to exit for its supervisor), else 200; a step running past the watchdog's bound is
reported as ``step_running_s``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from pensieve.api.state import services_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    services = services_of(request)
    engine = services.engine
    dead = getattr(engine, "dead_reason", None)
    if dead is not None:
        message = f"the inference engine stopped: {dead}"
        return JSONResponse({"type": "error", "status": "unavailable",
                             "error": {"type": "api_error", "message": message},
                             "model": services.config.model_id}, status_code=503)
    body: dict[str, object] = {"status": "ok", "model": services.config.model_id}
    running = getattr(engine, "step_running_s", 0.0)
    if running >= getattr(engine, "watchdog_s", float("inf")):
        body["step_running_s"] = round(running, 1)
    return JSONResponse(body)


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> Response:
    if request.method == "HEAD":
        return Response(status_code=200)
    if "text/html" in request.headers.get("accept", ""):  # a browser: the live status page
        return RedirectResponse("/ui", status_code=307)
    return JSONResponse({"name": "pensieve", "model": services_of(request).config.model_id})
