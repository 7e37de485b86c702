"""``GET /metrics``: Prometheus text exposition of the app's ``ServerMetrics``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from pensieve.api.auth import require_api_key
from pensieve.api.metrics import ServerMetrics

router = APIRouter(dependencies=[Depends(require_api_key)])


def metrics_of(request: Request) -> ServerMetrics:
    metrics: ServerMetrics = request.app.state.metrics
    return metrics


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(metrics_of(request).exposition(), media_type=CONTENT_TYPE_LATEST)
