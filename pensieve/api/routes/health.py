"""``GET /health`` and ``/`` (Claude Code sends ``HEAD /`` first): no auth, always 200."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pensieve.api.state import services_of

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "model": services_of(request).config.model_id})


@router.api_route("/", methods=["GET", "HEAD"])
async def root(request: Request) -> Response:
    if request.method == "HEAD":
        return Response(status_code=200)
    return JSONResponse({"name": "pensieve", "model": services_of(request).config.model_id})
