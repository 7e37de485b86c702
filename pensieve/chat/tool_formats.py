"""Tool-call formats: one ``ToolFormat`` per way a model writes its calls, in one table.

A format is everything Pensieve needs to know of a call's text: the markers that open and
close a call, the streaming parser that turns it into ``tool_use`` blocks, the grammar
builder that constrains it under ``tool_choice`` (every format has one), how its argument
values are written (JSON, or Qwen XML parameters), and what a call of it looks like in a
rendered template (to pick it).

Picking (``detect_tool_format``): the renderer renders a probe tool call through the
model's template and the first format whose ``call_pattern`` matches that text is the
model's. Fallback, documented in docs/tools.md: a template that does not render tools, or
renders calls in a format not in this table (DeepSeek, Kimi, MiniMax …), gets
Pensieve's built-in tool prompt, which asks for ``hermes`` — the model is told the format we
parse. Without a rendered call (a template source alone) the template's text is searched for
``template_signs``, ``hermes`` when none is found.

| format | calls look like | models |
|---|---|---|
| ``hermes`` | ``<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`` | Qwen 2.5, Qwen 3, Hermes, Granite 4, the built-in prompt (Gemma 2/3, SmolLM, Phi …) |
| ``qwen3_coder`` | ``<tool_call>\\n<function=NAME>\\n<parameter=P>\\nvalue\\n</parameter>\\n</function>\\n</tool_call>`` | Qwen3-Coder, Qwen 3.5, Nemotron 3 Nano, Step 3.5 |
| ``mistral`` | ``[TOOL_CALLS]NAME[ARGS]{…}`` (``[CALL_ID]id`` optional) | Mistral Small 3.2, Devstral, Ministral 3 |
| ``mistral_list`` | ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`` | Mistral Nemo, v3 tokenizers |
| ``llama3`` | ``{"name": …, "parameters": {…}}`` as the answer (or after ``<\\|python_tag\\|>``) | Llama 3.1–3.3 |
| ``glm`` | ``<tool_call>NAME<arg_key>k</arg_key><arg_value>v</arg_value>…</tool_call>`` (strings raw, other values JSON) | GLM-4.5, 4.6, 4.7 |
| ``harmony`` | ``<\\|channel\\|>commentary to=functions.NAME <\\|constrain\\|>json<\\|message\\|>{…}<\\|call\\|>`` | gpt-oss (its reasoning and answer channels too: ``tool_parsers/harmony.py``) |
| ``gemma4`` | ``<\\|tool_call>call:NAME{key:<\\|"\\|>text<\\|"\\|>,n:5}<tool_call\\|>`` | Gemma 4 |
| ``json_fence`` | ````` ```json\\n{"name": …, "arguments": {…}}\\n``` ````` | the drift of small Qwen models (``hermes`` reads it too) |
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pensieve.chat.tool_call_grammars import (
    GEMMA4_GRAMMAR,
    GLM_GRAMMAR,
    HARMONY_GRAMMAR,
    HERMES_GRAMMAR,
    JSON_FENCE_GRAMMAR,
    LLAMA3_GRAMMAR,
    MISTRAL_GRAMMAR,
    MISTRAL_LIST_GRAMMAR,
    QWEN3_CODER_GRAMMAR,
    CallGrammar,
)
from pensieve.chat.tool_parsers.base import ToolParser
from pensieve.chat.tool_parsers.gemma4 import Gemma4Parser
from pensieve.chat.tool_parsers.glm import GlmParser
from pensieve.chat.tool_parsers.harmony import HarmonyParser
from pensieve.chat.tool_parsers.hermes import HermesParser
from pensieve.chat.tool_parsers.json_fence import FENCE_END, JsonFenceParser
from pensieve.chat.tool_parsers.llama3 import Llama3Parser
from pensieve.chat.tool_parsers.mistral import MistralParser
from pensieve.chat.tool_parsers.qwen3_coder import Qwen3CoderParser

ArgumentsStyle = Literal["json", "qwen_xml", "glm_xml", "gemma"]


@dataclass(frozen=True)
class ToolFormat:
    """One tool-call format. ``parser`` reads calls as they stream; ``grammar`` constrains
    them; ``arguments`` says how argument values are written (``json``: one JSON object in
    the canonical layout; ``qwen_xml``: ``<parameter=key>value</parameter>`` per key;
    ``glm_xml``: ``<arg_key>key</arg_key><arg_value>value</arg_value>`` per key; ``gemma``:
    Gemma 4's object syntax, keys bare and strings between ``<|"|>``)."""

    name: str
    parser: type[ToolParser]
    grammar: CallGrammar
    end_markers: tuple[str, ...]  # text that closes a call ("" where the call's JSON does)
    call_pattern: re.Pattern[str] | None  # a rendered call of this format (None: never picked)
    template_signs: tuple[str, ...] = ()  # template source text that points to it
    arguments: ArgumentsStyle = "json"
    short_call_ids: bool = False  # its templates insist on 9-character call ids

    @property
    def start_markers(self) -> tuple[str, ...]:
        return self.parser.start_markers

    def make_parser(self, schemas: Mapping[str, Mapping[str, Any]] | None = None) -> ToolParser:
        return self.parser(schemas)


_NAME = r"[A-Za-z0-9_.\-]+"

HERMES = ToolFormat(
    "hermes", HermesParser, HERMES_GRAMMAR, ("</tool_call>", FENCE_END),
    re.compile(r'<tool_call>\s*\{\s*"name"\s*:'), ("<tool_call>",),
)
QWEN3_CODER = ToolFormat(
    "qwen3_coder", Qwen3CoderParser, QWEN3_CODER_GRAMMAR, ("</tool_call>",),
    re.compile(rf"<tool_call>\s*<function={_NAME}>\s*(<parameter=|</function>)"), ("<function=",),
    arguments="qwen_xml",
)
MISTRAL = ToolFormat(
    "mistral", MistralParser, MISTRAL_GRAMMAR, ("",),
    re.compile(rf"\[TOOL_CALLS\]\s*{_NAME}(\[CALL_ID\]\S*?)?\[ARGS\]"), ("[ARGS]",),
    short_call_ids=True,
)
MISTRAL_LIST = ToolFormat(
    "mistral_list", MistralParser, MISTRAL_LIST_GRAMMAR, ("]",),
    re.compile(r'\[TOOL_CALLS\]\s*\[\s*\{\s*"name"\s*:'), ("[TOOL_CALLS]",), short_call_ids=True,
)
LLAMA3 = ToolFormat(
    "llama3", Llama3Parser, LLAMA3_GRAMMAR, ("",),
    re.compile(r'(<\|python_tag\|>|^|\n)\s*\{\s*"name"\s*:\s*"[^"]+"\s*,\s*"parameters"\s*:'),
    ("<|python_tag|>", '"parameters": '),
)
GLM = ToolFormat(
    "glm", GlmParser, GLM_GRAMMAR, ("</tool_call>",),
    re.compile(rf"<tool_call>\s*{_NAME}\s*(<arg_key>|</tool_call>)"), ("<arg_key>",), arguments="glm_xml",
)
GEMMA4 = ToolFormat(
    "gemma4", Gemma4Parser, GEMMA4_GRAMMAR, ("<tool_call|>",),
    re.compile(rf"<\|tool_call>call:{_NAME}\{{"), ("<|tool_call>",), arguments="gemma",
)
HARMONY = ToolFormat(
    "harmony", HarmonyParser, HARMONY_GRAMMAR, ("<|call|>",),
    re.compile(rf"(to=functions\.{_NAME}\s*<\|channel\|>commentary|<\|channel\|>commentary to=functions\.)"),
    ("<|channel|>commentary",),
)
JSON_FENCE = ToolFormat("json_fence", JsonFenceParser, JSON_FENCE_GRAMMAR, (FENCE_END,), None)

# Most specific first: the first match wins (Qwen3-Coder and Hermes both open <tool_call>).
TOOL_FORMATS: dict[str, ToolFormat] = {
    f.name: f for f in (QWEN3_CODER, GLM, HARMONY, GEMMA4, MISTRAL, MISTRAL_LIST, HERMES, LLAMA3, JSON_FENCE)
}
DEFAULT_TOOL_FORMAT = HERMES.name  # the built-in tool prompt's


def get_tool_format(name: str) -> ToolFormat:
    try:
        return TOOL_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call format {name!r} (known: {', '.join(TOOL_FORMATS)})") from None


def detect_tool_format(template: str | None, rendered_call: str | None = None) -> str | None:
    """The format of a model's calls.

    ``rendered_call``: a tool call as the template renders it → the first format whose
    pattern matches, or None (a format Pensieve does not know). Without it, the template's
    source is searched for signs → a format, ``hermes`` when it shows none.
    """
    if rendered_call is not None:
        for fmt in TOOL_FORMATS.values():
            if fmt.call_pattern is not None and fmt.call_pattern.search(rendered_call):
                return fmt.name
        return None
    for fmt in TOOL_FORMATS.values():
        if template and any(sign in template for sign in fmt.template_signs):
            return fmt.name
    return DEFAULT_TOOL_FORMAT


def make_tool_parser(name: str, schemas: Mapping[str, Mapping[str, Any]] | None = None) -> ToolParser:
    """The streaming parser of format ``name`` (``schemas``: tool name → input schema)."""
    return get_tool_format(name).make_parser(schemas)
