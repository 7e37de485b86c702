"""Base classes for wire types and the helper that keys unions on ``type`` with a fallback.

Requests are permissive: unknown fields are kept (``extra="allow"``) and unknown block types
validate into a catch-all model, so a client that is newer than us is never refused.
Responses are strict: every field is declared and nothing else can be set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

log = logging.getLogger(__name__)

UNKNOWN_TAG = "__unknown__"


class RequestModel(BaseModel):
    """A part of a request body: unknown fields are accepted, kept and logged at debug."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_extra_fields(self) -> RequestModel:
        if self.model_extra and log.isEnabledFor(logging.DEBUG):
            log.debug("%s: ignoring fields %s", type(self).__name__, sorted(self.model_extra))
        return self


class ResponseModel(BaseModel):
    """A part of a response body: every field declared, nothing else."""

    model_config = ConfigDict(extra="forbid")


def tag_of(known: Iterable[str], *, key: str = "type", default: str | None = None) -> Callable[[Any], str]:
    """A pydantic ``Discriminator`` callable: the value's ``key`` if known, else ``UNKNOWN_TAG``.

    ``default`` is the tag used when the key is missing or null (e.g. tools without ``type``).
    """
    known_tags = frozenset(known)

    def discriminate(value: Any) -> str:
        tag = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
        if tag is None and default is not None:
            return default
        return tag if isinstance(tag, str) and tag in known_tags else UNKNOWN_TAG

    return discriminate
