"""Llama 3.1 / 3.2 / 3.3 JSON format: the answer *is* the call, a JSON object whose
arguments are under ``parameters``, either bare or after ``<|python_tag|>``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}

Several calls are separated by ``;``. A bare object must start with ``"name"`` to count as
a call (otherwise it is an answer that happens to be JSON, and stays text).
"""

from __future__ import annotations

from pensieve.chat.tool_parsers.base import JsonObjectsSection, ToolParser, ToolSection

PYTHON_TAG = "<|python_tag|>"


class Llama3Section(JsonObjectsSection):
    separators = ";"


class Llama3Parser(ToolParser):
    name = "llama3"
    start_markers = (PYTHON_TAG,)
    bare_json_start = True

    def open_section(self, marker: str) -> ToolSection:
        if marker == "{":
            return Llama3Section(marker, name_first=True, marker_is_content=True)
        return Llama3Section(marker)
