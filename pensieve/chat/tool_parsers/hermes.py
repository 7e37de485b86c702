"""Hermes / Qwen 2.5 / Qwen 3 format (and Pensieve's built-in tool prompt)::

    <tool_call>
    {"name": "Bash", "arguments": {"command": "ls"}}
    </tool_call>

One block per call; parallel calls are several blocks. A ``<tool_response>`` after a call is
the model inventing the result: the turn ends there. A fenced ```` ```json ```` call (the
drift of small Qwen models, ``json_fence.py``) is read as a call too, and so is a bare
``{"name": …, "arguments": …}`` object opening the answer whose name is an offered tool's
(the same models drop the tags too; any other JSON answer stays text).
"""

from __future__ import annotations

from pensieve.chat.tool_parsers.base import JsonObjectsSection, ToolParser, ToolSection
from pensieve.chat.tool_parsers.json_fence import FENCE_START, open_fence

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"


class HermesSection(JsonObjectsSection):
    end_marker = TOOL_CALL_END


class HermesParser(ToolParser):
    name = "hermes"
    start_markers = (TOOL_CALL_START, FENCE_START)
    stop_markers = (TOOL_RESPONSE_START,)
    bare_json_start = True

    def open_section(self, marker: str) -> ToolSection:
        if marker == "{":
            return HermesSection(marker, name_first=True, marker_is_content=True,
                                 known_names=frozenset(self.schemas))
        if marker == FENCE_START:
            return open_fence(marker, self.schemas)
        return HermesSection(marker)
