"""Thinking: which requests think, the model's reasoning markers, signatures.

A model thinks when its chat template has reasoning markers (``<think>``); templates that
read ``enable_thinking`` are told whether the request asked for thinking. Models without
markers accept thinking requests and simply produce no thinking block.

Signatures: a thinking block we stream ends with a ``signature_delta`` holding an HMAC-SHA256
of its text under a server key. When the block comes back in a later request's history, a
valid signature means it is our model's own thinking and it is rendered back; anything else
(another server's, edited, redacted) is dropped from the prompt, never refused.

``display: "omitted"``: the thinking block streams with no ``thinking_delta`` (its text is
``""``) and a signature that carries the text itself (compressed, under the same HMAC), so
the block sent back unchanged still renders the model's thinking: continuity without
transferring the text twice. Effort and thinking semantics: docs/thinking.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from pensieve.chat.segmenter import ThinkingMarkers
from pensieve.chat.tool_parsers.harmony import HARMONY_THINKING
from pensieve.protocol import (
    ConversationParams,
    ThinkingBlockParam,
    ThinkingConfigAdaptiveParam,
    ThinkingConfigBetweenToolsParam,
    ThinkingConfigEnabledParam,
)

log = logging.getLogger(__name__)

THINKING_KEY_ENV = "PENSIEVE_THINKING_KEY"
SIGNATURE_PREFIX = "pensieve1:"
SEALED_PREFIX = "pensieve1s:"  # an omitted block's signature: its text + the HMAC
_MAX_SEALED_BYTES = 1 << 24  # inflating a forged signature stops here
_MAC_CONTEXT = b"pensieve thinking v1\x00"

# Adaptive thinking: output_config.effort → a thinking budget in tokens (None: no budget
# beyond max_tokens). The API leaves the amount to the model; small local models need a cap.
GEMMA4_THINKING = ThinkingMarkers(open="<|channel>thought\n", close="<channel|>")

EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": None, "max": None}


@dataclass(frozen=True)
class ThinkingPlan:
    """How this request thinks — what the output side and the engine need to know.

    ``markers`` None: the model has no reasoning markers (it never thinks). ``starts_open``:
    the prompt itself opened a thinking section (generation starts inside it).
    ``budget_tokens``: thinking tokens allowed before the engine forces ``close_marker``.
    ``omitted``: ``display: "omitted"`` (the block's text is not streamed; it is sealed in
    the signature).
    """

    requested: bool = False
    markers: ThinkingMarkers | None = None
    budget_tokens: int | None = None
    starts_open: bool = False
    omitted: bool = False

    @property
    def enabled(self) -> bool:
        return self.requested and self.markers is not None

    @property
    def open_marker(self) -> str | None:
        return self.markers.open if self.markers else None

    @property
    def close_marker(self) -> str | None:
        return self.markers.close if self.markers else None


def detect_thinking_markers(template: str | None) -> ThinkingMarkers | None:
    """The reasoning markers a chat template uses, or None (gpt-oss: its analysis channel;
    Gemma 4: its thought channel)."""
    if template and HARMONY_THINKING.open in template:
        return HARMONY_THINKING
    if template and GEMMA4_THINKING.open.strip() in template:  # the source writes the newline escaped
        return GEMMA4_THINKING
    if template and ("<think>" in template or "enable_thinking" in template):
        return ThinkingMarkers()
    return None


def plan_thinking(request: ConversationParams, markers: ThinkingMarkers | None) -> ThinkingPlan:
    """``enabled``: its ``budget_tokens``; ``adaptive``: the budget of ``output_config.effort``
    (``EFFORT_BUDGETS``); ``between_tools``: no budget; absent, ``disabled`` or unknown: no
    thinking — ``effort`` alone never turns it on."""
    config = request.thinking
    omitted = getattr(config, "display", None) == "omitted"
    if isinstance(config, ThinkingConfigEnabledParam):
        return ThinkingPlan(True, markers, max(config.budget_tokens, 1), omitted=omitted)
    if isinstance(config, ThinkingConfigAdaptiveParam):
        return ThinkingPlan(True, markers, EFFORT_BUDGETS.get(request_effort(request) or ""), omitted=omitted)
    if isinstance(config, ThinkingConfigBetweenToolsParam):
        return ThinkingPlan(requested=True, markers=markers)
    return ThinkingPlan(requested=False, markers=markers)  # absent, disabled, or unknown


def request_effort(request: ConversationParams) -> str | None:
    """The effort of the turn being generated: the latest mid-conversation ``system`` message's
    ``output_config.effort`` (per-turn, the mid-conversation-output-config beta), else the
    top-level ``output_config.effort``."""
    for message in reversed(request.messages):
        per_turn = getattr(message, "output_config", None) if message.role == "system" else None
        if isinstance(per_turn, dict) and isinstance(per_turn.get("effort"), str):
            return per_turn["effort"]
    return request.output_config.effort if request.output_config else None


def prompt_opens_thinking(prompt_text: str, markers: ThinkingMarkers | None) -> bool:
    """Does the prompt end inside a thinking section (``…<think>\\n``)?"""
    return markers is not None and prompt_text.rstrip().endswith(markers.open)


def thinking_key_from_env(environ: Mapping[str, str] = os.environ) -> bytes:
    """``PENSIEVE_THINKING_KEY`` (so signatures survive restarts and replicas), else a
    random key for this process."""
    value = environ.get(THINKING_KEY_ENV)
    return value.encode("utf-8") if value else secrets.token_bytes(32)


class ThinkingSigner:
    """Signs thinking text and checks signatures (HMAC-SHA256 under a server key)."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("the thinking key must not be empty")
        self._key = key

    def __repr__(self) -> str:
        return "ThinkingSigner(<key>)"

    def sign(self, thinking: str) -> str:
        mac = hmac.new(self._key, _MAC_CONTEXT + thinking.encode("utf-8"), hashlib.sha256).digest()
        return SIGNATURE_PREFIX + base64.b64encode(mac).decode("ascii")

    def verify(self, thinking: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(thinking).encode(), signature.encode("utf-8", "replace"))

    def seal(self, thinking: str) -> str:
        """The signature of an omitted block: the text (zlib, base64) and its HMAC."""
        packed = base64.urlsafe_b64encode(zlib.compress(thinking.encode("utf-8"))).decode("ascii")
        return f"{SEALED_PREFIX}{packed}.{self.sign(thinking)[len(SIGNATURE_PREFIX):]}"

    def unseal(self, signature: str) -> str | None:
        """The text a ``seal`` signature carries, or None if it is not ours or was altered."""
        if not signature.startswith(SEALED_PREFIX) or "." not in signature:
            return None
        packed, _, mac = signature[len(SEALED_PREFIX):].partition(".")
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(base64.urlsafe_b64decode(packed), _MAX_SEALED_BYTES)
            if inflate.unconsumed_tail:  # larger than any thinking we sealed: not ours
                return None
            thinking = raw.decode("utf-8")
        except (ValueError, zlib.error, UnicodeDecodeError):
            return None
        return thinking if self.verify(thinking, SIGNATURE_PREFIX + mac) else None


@dataclass(frozen=True)
class ThinkingHistory:
    """How past thinking renders back into a prompt: verified blocks only, either in the
    template's ``reasoning_content`` field (``field``: gpt-oss reads ``thinking``) or as
    ``<think>…</think>`` before the content."""

    signer: ThinkingSigner
    markers: ThinkingMarkers
    as_field: bool = False
    field: str = "reasoning_content"

    def verified(self, block: ThinkingBlockParam) -> str | None:
        if block.thinking and self.signer.verify(block.thinking, block.signature):
            return block.thinking
        if not block.thinking:  # display "omitted": the text travels in the signature
            sealed = self.signer.unseal(block.signature)
            if sealed:
                return sealed
        log.debug("dropping a thinking block with an unknown signature from the prompt")
        return None

    def wrap(self, thinking: str, content: str) -> str:
        return f"{self.markers.open}\n{thinking}\n{self.markers.close}\n\n{content}"
