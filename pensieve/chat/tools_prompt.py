"""Which tools a request offers, and Pensieve's built-in tool prompt.

A template that renders ``tools`` (and tool calls and results) gets them in Hugging Face
format; for any other template the tools go into the system prompt as the section below,
which asks for the Hermes format. docs/tools.md shows it whole.

Deferred tools (``defer_loading: true``) are not offered — neither listed nor callable —
until the conversation loads them: a ``tool_reference`` block (what tool search returns) or a
``tool_addition`` directive naming them. A large deferred tool set so keeps the prompt small.

The section is byte-stable: tools are listed in request order as compact JSON with their
keys as sent, and everything that depends on ``tool_choice`` comes last, so requests that
differ only there still share the prefix up to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pensieve.protocol import (
    ConversationParams,
    ToolChoiceAnyParam,
    ToolChoiceNoneParam,
    ToolChoiceToolParam,
    ToolParam,
    ToolReferenceBlockParam,
    ToolResultBlockParam,
)

log = logging.getLogger(__name__)

ToolChoiceMode = Literal["auto", "any", "tool"]

TOOLS_INTRO = (
    "# Tools\n\n"
    "You can call tools to help with the user's request. The tools are listed below, one JSON "
    "object per line with the tool's name, its description and the JSON schema of its arguments:\n"
)
TOOLS_HOWTO = (
    "To call a tool, write a <tool_call> block holding one JSON object with the tool's name "
    "and its arguments, exactly like this:\n"
    "<tool_call>\n"
    '{"name": "<tool name>", "arguments": {<arguments as JSON>}}\n'
    "</tool_call>\n"
    "The arguments must follow the tool's schema. After your tool calls, stop: the results "
    "come back in the next message, each inside <tool_response></tool_response> tags."
)
PARALLEL_CALLS = "To call several tools at once, write one <tool_call> block per call."
SINGLE_CALL = "Call at most one tool in this reply."
CHOICE_AUTO = "Call a tool only when it helps; otherwise answer directly."
CHOICE_ANY = "You must call at least one tool in this reply."
CHOICE_TOOL = 'You must call the tool "{name}" in this reply.'


@dataclass(frozen=True)
class ToolsPlan:
    """The tools a prompt offers and how calls come back.

    For the output side: ``format`` names the tool-call parser; ``max_calls`` ends the turn
    after that many calls. For constrained decoding: ``tools`` (their schemas), ``choice``
    (``any``/``tool`` force a call), ``forced_name`` (the tool ``tool`` forces).
    """

    format: str  # a key of pensieve.chat.tool_parsers.TOOL_PARSERS
    tools: tuple[ToolParam, ...]
    choice: ToolChoiceMode = "auto"
    forced_name: str | None = None
    parallel: bool = True
    native: bool = False  # rendered by the model's own template (else the built-in prompt)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool.name for tool in self.tools)

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1

    def schemas(self) -> dict[str, Mapping[str, Any]]:
        return {tool.name: tool.input_schema for tool in self.tools}


def plan_tools(request: ConversationParams, *, tool_format: str, native: bool) -> ToolsPlan | None:
    """The tools ``request`` offers the model, or None (no client tools, or ``none``)."""
    tools = offered_tools(request)
    choice = request.tool_choice
    if not tools or isinstance(choice, ToolChoiceNoneParam):
        return None
    mode: ToolChoiceMode = "auto"
    forced = None
    if isinstance(choice, ToolChoiceAnyParam):
        mode = "any"
    elif isinstance(choice, ToolChoiceToolParam):
        mode, forced = "tool", choice.name
    parallel = not getattr(choice, "disable_parallel_tool_use", None)
    return ToolsPlan(tool_format, tools, mode, forced, parallel, native)


def offered_tools(request: ConversationParams) -> tuple[ToolParam, ...]:
    """The client tools of ``request`` the model sees: deferred ones only once loaded."""
    tools = [t for t in request.tools or () if isinstance(t, ToolParam)]
    deferred = {t.name for t in tools if t.defer_loading}
    if not deferred:
        return tuple(tools)
    loaded = loaded_tool_names(request) & deferred
    log.debug("%d deferred tool(s), %d loaded by a tool_reference", len(deferred), len(loaded))
    return tuple(t for t in tools if not t.defer_loading or t.name in loaded)


def loaded_tool_names(request: ConversationParams) -> set[str]:
    """Tool names the conversation loaded: ``tool_reference`` blocks (anywhere, tool results
    included) and ``tool_addition`` directives of system messages."""
    names: set[str] = set()
    for message in request.messages:
        if isinstance(message.content, list):
            names.update(_referenced(message.content))
    return names


def _referenced(blocks: Iterable[object]) -> Iterable[str]:
    for block in blocks:
        if isinstance(block, ToolReferenceBlockParam):
            yield block.tool_name
        elif isinstance(block, ToolResultBlockParam) and isinstance(block.content, list):
            yield from _referenced(block.content)
        elif getattr(block, "type", None) == "tool_addition":
            tool = (getattr(block, "model_extra", None) or {}).get("tool")
            name = tool.get("tool_name") or tool.get("name") if isinstance(tool, dict) else None
            if isinstance(name, str):
                yield name


def tool_json(tool: ToolParam) -> str:
    """One tool as one line of compact JSON (keys of the schema in the order sent)."""
    spec = {"name": tool.name, "description": tool.description or "", "parameters": tool.input_schema}
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))


def builtin_tool_prompt(plan: ToolsPlan) -> str:
    """The system-prompt section that offers ``plan.tools`` to a model whose template cannot."""
    listing = "\n".join(tool_json(tool) for tool in plan.tools)
    return f"{TOOLS_INTRO}<tools>\n{listing}\n</tools>\n\n{TOOLS_HOWTO}\n{choice_instruction(plan)}"


def choice_instruction(plan: ToolsPlan) -> str:
    """What ``tool_choice`` and ``disable_parallel_tool_use`` ask, as instructions."""
    if plan.choice == "tool":
        choice = CHOICE_TOOL.format(name=plan.forced_name)
    else:
        choice = CHOICE_ANY if plan.choice == "any" else CHOICE_AUTO
    return f"{PARALLEL_CALLS if plan.parallel else SINGLE_CALL} {choice}"


def native_choice_note(plan: ToolsPlan) -> str:
    """For templates that render the tools themselves: only what differs from the default."""
    if plan.choice == "auto" and plan.parallel:
        return ""
    return choice_instruction(plan)


def template_tools(plan: ToolsPlan) -> list[dict[str, Any]]:
    """The tools in the shape Hugging Face chat templates expect."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
        }
        for t in plan.tools
    ]
