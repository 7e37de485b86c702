"""What the routes share: config, engine and renderer, kept on ``app.state``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from pensieve.api.config import ApiConfig
from pensieve.chat import PromptRenderer
from pensieve.engine.types import GenerationDelta, SamplingParams


class GenerationClient(Protocol):
    """The part of ``pensieve.engine.client.EngineClient`` the API uses (no torch import here)."""

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationDelta]: ...

    def overload(self) -> str | None:
        """Why a new request would be refused now (queue too long, KV full), or None. Cheap
        and callable from the event loop: the routes ask before reading a body."""
        ...


@dataclass(frozen=True)
class Services:
    config: ApiConfig
    engine: GenerationClient
    renderer: PromptRenderer


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
