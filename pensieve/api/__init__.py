"""HTTP layer: FastAPI app, routes, SSE framing, auth, error envelope. Never sees tensors."""

from pensieve.api.app import create_app
from pensieve.api.config import ApiConfig
from pensieve.api.state import GenerationClient

__all__ = ["ApiConfig", "GenerationClient", "create_app"]
