"""Tool-call parsers: one small streaming parser per format (hermes, llama3, mistral,
qwen3_coder, json_fence) over a shared incremental JSON scanner.

The formats themselves — markers, parser, grammar, how a template shows them — are one table
in ``pensieve.chat.tool_formats``; ``detect_tool_format``, ``make_tool_parser`` and
``DEFAULT_TOOL_FORMAT`` are re-exported here from it (imported on first use: that module
imports the parsers).
"""

from __future__ import annotations

from typing import Any

from pensieve.chat.tool_parsers.base import Schemas, ToolParser, ToolSection

_FROM_FORMATS = ("DEFAULT_TOOL_FORMAT", "detect_tool_format", "make_tool_parser")


def __getattr__(name: str) -> Any:
    if name in _FROM_FORMATS:
        from pensieve.chat import tool_formats

        return getattr(tool_formats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_TOOL_FORMAT", "Schemas", "ToolParser", "ToolSection", "detect_tool_format", "make_tool_parser"]
