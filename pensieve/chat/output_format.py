"""Structured outputs: ``output_config.format: {"type": "json_schema", "schema": …}`` (or the
top-level ``output_format`` of the structured-outputs-2025-11-13 beta, which older SDKs send).

The answer is one JSON value that validates against the schema: the engine constrains it with
the schema's grammar (the same xgrammar EBNF, canonical layout and per-keyword degradation as
tool arguments, ``tool_grammar.arguments_ebnf``): a keyword xgrammar cannot compile is dropped
(logged) and the answer still parses, never a 400. The system prompt gains one short
instruction with the schema, so a small model also fills the structure sensibly; the
instruction is part of the prompt, so ``count_tokens`` counts it.

With tools under ``tool_choice: auto`` the answer is either tool calls or the JSON (an
xgrammar structural tag ``or``); a forced call (``any``/``tool``) leaves no text to format.
A prefill (a trailing assistant message) turns the constraint off: the grammar describes a
whole answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pensieve.chat.tool_grammar import FALLBACK_SCHEMA, arguments_ebnf
from pensieve.engine.grammar import grammar_available
from pensieve.engine.types import GrammarSpec
from pensieve.protocol import ConversationParams, JSONOutputFormatParam, MessageCreateParams

log = logging.getLogger(__name__)

JSON_SCHEMA_FORMAT = "json_schema"
FORMAT_INSTRUCTION = (
    "Answer with a single JSON value and nothing else. It must validate against this JSON schema:\n"
)


class OutputFormatError(ValueError):
    """``output_config.format`` is malformed (its ``schema`` is not a JSON Schema)."""


def answer_schema(request: ConversationParams | MessageCreateParams) -> dict[str, Any] | bool | None:
    """The schema the answer must follow, or None (no format, or a format type we do not know).

    Raises ``OutputFormatError`` when a ``json_schema`` format carries no object schema."""
    config = request.output_config
    fmt = config.format if config is not None else None
    if fmt is None:
        legacy = (request.model_extra or {}).get("output_format")  # the 2025-11-13 beta's place
        if not isinstance(legacy, dict):
            return None
        fmt = JSONOutputFormatParam.model_validate(legacy)
    if fmt.type != JSON_SCHEMA_FORMAT:
        log.debug("output_config.format of type %r is not supported; ignored", fmt.type)
        return None
    schema = fmt.schema_
    if not isinstance(schema, (dict, bool)):
        raise OutputFormatError("output_config.format.schema: a JSON Schema object is required")
    return schema


def format_instruction(schema: dict[str, Any] | bool | None) -> str:
    """The system-prompt line that asks for the JSON (byte-stable: keys as sent)."""
    if schema is None:
        return ""
    return FORMAT_INSTRUCTION + json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


def answer_content(schema: dict[str, Any] | bool) -> dict[str, Any] | None:
    """The structural-tag content that matches the answer (None: xgrammar compiles nothing)."""
    ebnf = arguments_ebnf(schema)
    return None if ebnf is None else {"type": "grammar", "grammar": ebnf}


def answer_grammar(schema: dict[str, Any] | bool) -> GrammarSpec | None:
    """The grammar of an answer that is only the JSON (None without xgrammar)."""
    if not grammar_available():
        log.warning("xgrammar is not installed: output_config.format is not enforced")
        return None
    ebnf = arguments_ebnf(schema)
    if ebnf is None:
        log.warning("xgrammar compiles no grammar for output_config.format: the answer is not constrained")
        return None
    loose = arguments_ebnf(FALLBACK_SCHEMA)
    fallback = None if loose is None else GrammarSpec("ebnf", loose, label="structured output, schema unchecked")
    return GrammarSpec("ebnf", ebnf, label="structured output", fallback=fallback)
