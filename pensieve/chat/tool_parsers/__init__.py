"""Tool-call formats: one small parser per format behind one registry.

``detect_tool_format(template)`` picks a format from the model's chat template text;
``make_tool_parser(name, schemas)`` builds its parser. Pensieve's built-in tool prompt (for
templates without tool support) asks for the Hermes format.
"""

from __future__ import annotations

from pensieve.chat.tool_parsers.base import Schemas, ToolParser, ToolSection
from pensieve.chat.tool_parsers.hermes import HermesParser
from pensieve.chat.tool_parsers.llama3 import Llama3Parser
from pensieve.chat.tool_parsers.mistral import MistralParser
from pensieve.chat.tool_parsers.qwen3_coder import Qwen3CoderParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3Parser, MistralParser, Qwen3CoderParser)
}
DEFAULT_TOOL_FORMAT = HermesParser.name

# (what the template contains, the format): the first match wins, most specific first.
_TEMPLATE_SIGNS: tuple[tuple[str, str], ...] = (
    ("<function=", Qwen3CoderParser.name),
    ("[TOOL_CALLS]", MistralParser.name),
    ("<tool_call>", HermesParser.name),
    ("<|python_tag|>", Llama3Parser.name),
    ('"parameters": ', Llama3Parser.name),
)


def detect_tool_format(template: str | None) -> str:
    """The tool-call format a chat template teaches its model (``hermes`` if it shows none)."""
    for sign, name in _TEMPLATE_SIGNS:
        if template and sign in template:
            return name
    return DEFAULT_TOOL_FORMAT


def make_tool_parser(name: str, schemas: Schemas | None = None) -> ToolParser:
    try:
        parser = TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r} (known: {', '.join(TOOL_PARSERS)})") from None
    return parser(schemas)


__all__ = [
    "DEFAULT_TOOL_FORMAT",
    "TOOL_PARSERS",
    "Schemas",
    "ToolParser",
    "ToolSection",
    "detect_tool_format",
    "make_tool_parser",
]
