"""Message Batches: many Messages requests run in the background at a lower priority than
interactive ones, persisted on disk so that a restart loses none (``store``), run through the
same generation path as ``POST /v1/messages`` (``runner``), served by ``api.routes.batches``."""

from pensieve.api.batches.config import BatchConfig
from pensieve.api.batches.runner import BatchRunner
from pensieve.api.batches.store import BatchStore

__all__ = ["BatchConfig", "BatchRunner", "BatchStore"]
