"""A drift, not a template's format: small models (Qwen 2.5 0.5B–3B, mostly) asked for
``<tool_call>`` blocks often write the call as a fenced JSON block instead::

    ```json
    {"name": "Bash", "arguments": {"command": "ls"}}
    ```

Read as a call only when the object's first key is ``name`` and, when the tools are known,
the name is an offered tool's: any other fenced JSON is an answer and stays text, fences
included.
"""

from __future__ import annotations

from pensieve.chat.tool_parsers.base import JsonObjectsSection, Schemas, ToolParser, ToolSection

FENCE_START = "```json"
FENCE_END = "```"


class JsonFenceSection(JsonObjectsSection):
    end_marker = FENCE_END


def open_fence(marker: str, schemas: Schemas) -> ToolSection:
    """The section after ``FENCE_START``: one call object, then the closing fence."""
    return JsonFenceSection(marker, name_first=True, known_names=frozenset(schemas) if schemas else None)


class JsonFenceParser(ToolParser):
    name = "json_fence"
    start_markers = (FENCE_START,)

    def open_section(self, marker: str) -> ToolSection:
        return open_fence(marker, self.schemas)
