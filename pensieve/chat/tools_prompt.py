"""Which tools a request offers, and Pensieve's built-in tool prompt.

A template that renders ``tools`` (and tool calls and results) gets them in Hugging Face
format; for any other template the tools go into the system prompt as the section below,
which asks for the Hermes format. docs/tools.md shows it whole.

Which tools are offered is ``tool_changes.offered_tools``'s answer: deferred tools
(``defer_loading: true``) only once a ``tool_reference`` or ``tool_addition`` loads them — a
large deferred set so keeps the prompt small — and mid-conversation additions and removals.

The section is byte-stable: tools are listed in request order as compact JSON with their
keys as sent, and everything that depends on ``tool_choice`` comes last, so requests that
differ only there still share the prefix up to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pensieve.chat.tool_changes import offered_tools
from pensieve.protocol import (
    ConversationParams,
    ToolChoiceAnyParam,
    ToolChoiceNoneParam,
    ToolChoiceToolParam,
    ToolParam,
)

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
