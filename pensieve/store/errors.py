"""What the store raises; every message says what to do next."""

from __future__ import annotations


class StoreError(Exception):
    """A store or pull operation failed; ``str()`` is one line a user can act on."""


class ModelNotFound(StoreError, FileNotFoundError):
    """Neither a path nor a name in the store or the catalogue."""


class ModelNotPulled(ModelNotFound):
    """A catalogue name that is not in the store yet (``pensieve pull NAME`` fetches it)."""
