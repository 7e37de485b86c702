"""Where Pensieve keeps its state: ``$PENSIEVE_HOME`` or ``~/.pensieve``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def pensieve_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("PENSIEVE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".pensieve"


def store_root(env: Mapping[str, str] | None = None) -> Path:
    """The model store: ``$PENSIEVE_HOME/models`` (default ``~/.pensieve/models``)."""
    return pensieve_home(env) / "models"
