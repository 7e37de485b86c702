"""Limits checked after parsing and before rendering: counts a client could inflate without
bound (messages, tools, schema bytes, stop sequences) and a prompt that cannot fit the context
whatever it tokenizes to (its text is longer than ``context × the longest token``): both are
refused before any tokenizing, so a 30 MB body costs a parse, not seconds of CPU and GBs."""

from __future__ import annotations

import json
from typing import Any

from pensieve.api.config import ApiConfig
from pensieve.api.errors import invalid_request, prompt_too_long
from pensieve.chat.prompt_text import min_prompt_tokens
from pensieve.protocol import ConversationParams, MessageCreateParams


def check_request_limits(config: ApiConfig, request: ConversationParams, tokenizer: Any) -> None:
    """Raise 400 ``invalid_request_error`` for a request over a configured cap, or the
    ``prompt is too long`` error when its text alone cannot fit the context."""
    _at_most(len(request.messages), config.max_messages, "messages")
    tools = request.tools or []
    _at_most(len(tools), config.max_tools, "tools")
    for i, tool in enumerate(tools):
        schema = getattr(tool, "input_schema", None)
        if schema is not None:
            size = len(json.dumps(schema, ensure_ascii=False).encode())
            if size > config.max_tool_schema_bytes:
                raise invalid_request(f"tools.{i}.input_schema: {size} bytes exceeds the "
                                      f"{config.max_tool_schema_bytes}-byte limit")
    if isinstance(request, MessageCreateParams):
        stops = request.stop_sequences or []
        _at_most(len(stops), config.max_stop_sequences, "stop_sequences")
        for i, stop in enumerate(stops):
            if len(stop) > config.max_stop_sequence_chars:
                raise invalid_request(f"stop_sequences.{i}: {len(stop)} characters exceeds the "
                                      f"{config.max_stop_sequence_chars}-character limit")
    at_least = min_prompt_tokens(request, tokenizer)
    if at_least >= config.context_length:
        raise prompt_too_long(at_least, config.context_length)


def _at_most(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise invalid_request(f"{what}: {count} items exceeds the limit of {limit}")
