"""The error that ends `pensieve serve` with a message instead of a traceback."""

from __future__ import annotations


class StartupError(Exception):
    """A configuration that must not start (bad flags, unsafe bind, unloadable model)."""
