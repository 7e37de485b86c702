"""A small loopback stand-in for a vLLM replica, for the upstream backend's unit tests.

It speaks the slice of vLLM's HTTP API that Pensieve uses (``/health``, ``/v1/models``,
streamed ``/v1/completions`` with ``return_token_ids``) and records what it was sent. It
answers with the token ids a test scripts; the real boundary is covered by
``tests/integration/test_upstream_vllm.py`` against real vLLM.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class FakeVllm:
    """``script(body) → (token ids, finish reason)``; each id is streamed as its own chunk
    (every ``pace_s``), then a usage chunk with ``cached_tokens`` and ``[DONE]``."""

    name: str
    script: Callable[[dict[str, Any]], tuple[list[int], str]]
    model: str = "fake-model"
    max_model_len: int = 4096
    cached_tokens: int = 0
    pace_s: float = 0.0
    status: int = 200  # answer /v1/completions with this (e.g. 503, 400)
    healthy: bool = True
    requests: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)
    disconnects: int = 0  # streams the client closed before their end
    streamed: int = 0  # token ids sent in all

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/health", self._health),
            Route("/v1/models", self._models),
            Route("/v1/completions", self._completions, methods=["POST"]),
        ])

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200 if self.healthy else 503)

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model, "object": "model", "max_model_len": self.max_model_len}]})

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append((body, {k.lower(): v for k, v in request.headers.items()}))
        if self.status != 200:
            return JSONResponse({"error": {"message": f"{self.name} refuses", "type": "BadRequest"}},
                                status_code=self.status)
        ids, reason = self.script(body)
        return StreamingResponse(self._events(body, ids, reason), media_type="text/event-stream")

    async def _events(self, body: dict[str, Any], ids: list[int], reason: str):  # noqa: ANN202
        finished = False
        try:
            for i, token in enumerate(ids):
                last = i == len(ids) - 1
                choice = {"index": 0, "text": "", "token_ids": [token],
                          "finish_reason": reason if last else None}
                yield _sse({"id": "cmpl-1", "object": "text_completion", "choices": [choice]})
                self.streamed += 1
                if self.pace_s:
                    await asyncio.sleep(self.pace_s)
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(ids),
                     "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
            yield _sse({"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.disconnects += 1


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"
