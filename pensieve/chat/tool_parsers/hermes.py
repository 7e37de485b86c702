"""Hermes / Qwen 2.5 / Qwen 3 format (and Pensieve's built-in tool prompt)::

    <tool_call>
    {"name": "Bash", "arguments": {"command": "ls"}}
    </tool_call>

One block per call; parallel calls are several blocks. A ``<tool_response>`` after a call is
the model inventing the result: the turn ends there.
"""

from __future__ import annotations

from pensieve.chat.tool_parsers.base import JsonObjectsSection, ToolParser, ToolSection

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"


class HermesSection(JsonObjectsSection):
    end_marker = TOOL_CALL_END


class HermesParser(ToolParser):
    name = "hermes"
    start_markers = (TOOL_CALL_START,)
    stop_markers = (TOOL_RESPONSE_START,)

    def open_section(self, marker: str) -> ToolSection:
        return HermesSection(marker)
