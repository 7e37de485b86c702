"""A typed body, serialised once (pydantic writes the JSON; no dict round trip)."""

from __future__ import annotations

from fastapi.responses import Response
from pydantic import BaseModel


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    return Response(content=body.model_dump_json(), status_code=status_code, media_type="application/json")
