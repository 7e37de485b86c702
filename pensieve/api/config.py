"""What the HTTP layer needs to know, built once by the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pensieve.engine.types import DryParams

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """``model_id`` is the served model's name; a request may name it, one of
    ``model_aliases`` (alias → model) or, with ``accept_any_claude_model``, any ``claude-*``
    name (Claude Code asks for its own models). One model is served, so every alias resolves
    to it whatever its target says. ``api_keys`` empty → no authentication.
    ``context_length`` bounds prompt + output tokens of one request.
    """

    model_id: str
    context_length: int
    api_keys: tuple[str, ...] = ()
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    accept_any_claude_model: bool = True
    ping_interval_s: float = 10.0
    # temperature for requests that send none (the API's own default is 1.0; Claude Code
    # never sends one, and small local models loop at 1.0)
    default_temperature: float = 1.0
    # the model's own top_p / top_k (its store manifest or generation_config.json), likewise
    # for requests that send none; 1.0 / 0 → off
    default_top_p: float = 1.0
    default_top_k: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 60.0  # the whole request body must arrive within this
    # a generation still running this long after its request arrived is stopped (504
    # timeout_error, or an error event mid-stream) and its KV freed; None → no deadline
    request_timeout_s: float | None = 3600.0
    # caps on what a request may hold (api/limits.py); generous for Claude Code's traffic
    max_messages: int = 100_000
    max_tools: int = 1_000
    max_tool_schema_bytes: int = 1024 * 1024
    max_stop_sequences: int = 256
    max_stop_sequence_chars: int = 1_000
    # the loop guard applied to every request (the API has no such knob); None → off
    dry: DryParams | None = None

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("ApiConfig.model_id must not be empty")
        if self.context_length < 2:
            raise ValueError(f"ApiConfig.context_length must be at least 2, got {self.context_length}")
        if not 0.0 <= self.default_temperature <= 2.0:
            raise ValueError(f"default temperature must be in [0, 2], got {self.default_temperature}")
        if not 0.0 < self.default_top_p <= 1.0 or self.default_top_k < 0:
            raise ValueError(f"default top_p must be in (0, 1] and top_k ≥ 0, got "
                             f"{self.default_top_p}, {self.default_top_k}")
        if self.ping_interval_s <= 0:
            raise ValueError(f"ApiConfig.ping_interval_s must be positive, got {self.ping_interval_s}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"ApiConfig.body_timeout_s must be positive, got {self.body_timeout_s}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"ApiConfig.request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"ApiConfig.max_body_bytes must be positive, got {self.max_body_bytes}")
        for cap in ("max_messages", "max_tools", "max_tool_schema_bytes", "max_stop_sequences",
                    "max_stop_sequence_chars"):
            if getattr(self, cap) < 1:
                raise ValueError(f"ApiConfig.{cap} must be at least 1, got {getattr(self, cap)}")
        if any(not key for key in self.api_keys):
            raise ValueError("ApiConfig.api_keys must not contain an empty key")
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        object.__setattr__(self, "model_aliases", MappingProxyType(dict(self.model_aliases)))

    def sampling_defaults(self) -> dict[str, float | int]:
        """What a request that sends no sampling fields gets (shown in ``/v1/models``)."""
        out: dict[str, float | int] = {"temperature": self.default_temperature,
                                       "top_p": self.default_top_p, "top_k": self.default_top_k}
        if self.dry is not None:
            out["repeat_guard"] = self.dry.multiplier
        return out

    def resolve_model(self, name: str) -> str | None:
        """The served model id that ``name`` refers to, or None if it names no model here."""
        if name == self.model_id or name in self.model_aliases:
            return self.model_id
        if self.accept_any_claude_model and name.startswith("claude-"):
            return self.model_id
        return None
