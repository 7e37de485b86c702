"""tool_choice → the grammar that makes the model's tool calls well-formed and schema-valid
(and a thinking budget's markers → the token ids the engine forces).

``tool_call_grammar(tools, choice=…, tool_format=…)`` builds an xgrammar structural tag:

- ``any``: the answer is one or more calls (exactly one with ``disable_parallel_tool_use``)
  of the offered tools, nothing else; ``tool``: the same, of the named tool only;
- ``auto`` (also when ``tool_choice`` is absent): free text, but once the model opens a call
  (``<tool_call>`` in Hermes) the name must be an offered tool's and the arguments must match
  its ``input_schema``; with ``disable_parallel_tool_use`` the turn ends after one call;
- ``none``, no tools, or an unknown format: no grammar.

Every format of ``pensieve.chat.tool_formats`` has a grammar: the format's builder
(``tool_call_grammars.py``) lays out the calls, this module supplies each tool's arguments:
JSON in one canonical layout (``{"command": "ls", "timeout": 5}``), Qwen XML parameters
for ``qwen3_coder``, GLM key/value pairs for ``glm``, Gemma's object syntax for ``gemma4``. Each tool's schema is vetted by xgrammar first; keywords it cannot
compile are dropped (logged once per schema), stage by stage, until it compiles — a schema
never fails a request.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pensieve.chat.tool_formats import DEFAULT_TOOL_FORMAT, TOOL_FORMATS, ArgumentsStyle
from pensieve.engine.grammar import (
    GrammarError,
    GrammarUnavailableError,
    check_structural_tag,
    grammar_available,
    json_schema_ebnf,
)
from pensieve.engine.types import GrammarSpec, ThinkingBudget
from pensieve.protocol import ConversationParams, ToolParam

if TYPE_CHECKING:
    from pensieve.chat.prompt import RenderedPrompt

log = logging.getLogger(__name__)


def tool_call_grammar(
    tools: Sequence[ToolParam],
    *,
    choice: str = "auto",
    forced_name: str | None = None,
    parallel: bool = True,
    tool_format: str | None = DEFAULT_TOOL_FORMAT,
    answer: dict[str, Any] | None = None,
    thinking: bool = False,
) -> GrammarSpec | None:
    """The grammar for calls of ``tools`` in ``tool_format``, or None when nothing is constrained.

    ``choice`` is ``auto``/``any``/``tool`` (``forced_name`` then names the tool) or ``none``.
    ``answer``: under ``auto``, the structural-tag content a text answer must match instead
    of free text (structured outputs): the turn is then calls or that answer. ``thinking``:
    the request thinks (gpt-oss then may reason before a forced call).
    Raises GrammarUnavailableError when a call is forced and xgrammar is not installed;
    ``auto`` then runs unconstrained (with a warning).
    """
    tools = [t for t in tools if isinstance(t, ToolParam)]
    if not tools or choice == "none":
        return None
    if choice not in ("auto", "any", "tool"):
        choice = "auto"  # a tool_choice newer than us: the API's default
    fmt = TOOL_FORMATS.get(tool_format or "")
    if fmt is None:
        log.warning("no tool-call grammar for format %r: tool calls are not constrained", tool_format)
        return None
    if choice == "tool":
        named = [t for t in tools if t.name == forced_name]
        if not named:
            log.warning("tool_choice names %r, which is not offered: any tool is allowed", forced_name)
        tools, choice = (named, "tool") if named else (tools, "any")
    if not grammar_available():
        if choice == "auto":
            log.warning("xgrammar is not installed: tool calls under tool_choice auto are not constrained")
            return None
        raise GrammarUnavailableError()
    contents = [arguments_content(t.input_schema, fmt.arguments) for t in tools]
    if None in contents:
        log.warning("xgrammar compiles no arguments grammar: tool calls are not constrained")
        return None
    calls_grammar = fmt.grammar.thinking() if thinking else fmt.grammar
    build = calls_grammar.auto if choice == "auto" else calls_grammar.forced
    if choice == "auto" and answer is not None:
        forced = calls_grammar.forced
        build = lambda calls, par: {"type": "or", "elements": [forced(calls, par), answer]}  # noqa: E731
    label = f"{fmt.name} tool_choice={choice} over {_tool_set(tools)}{' or a structured answer' if answer else ''}"
    loose = arguments_content(FALLBACK_SCHEMA, fmt.arguments)  # compiles in milliseconds
    fallback = None if loose is None else GrammarSpec(
        "structural_tag", json.dumps({"type": "structural_tag", "format": build([(t.name, loose) for t in tools], parallel)}),
        label=f"{label}, arguments unchecked")
    calls = [(t.name, content) for t, content in zip(tools, contents) if content is not None]
    payload = json.dumps({"type": "structural_tag", "format": build(calls, parallel)})
    return GrammarSpec("structural_tag", payload, label=label, fallback=fallback)


def _tool_set(tools: Sequence[ToolParam], shown: int = 6) -> str:
    """``3 tool(s) (Bash, Read, Edit)``: names the tool set in logs."""
    names = [t.name for t in tools[:shown]] + (["…"] if len(tools) > shown else [])
    return f"{len(tools)} tool(s) ({', '.join(names)})"


def request_tool_grammar(request: ConversationParams, tool_format: str | None = DEFAULT_TOOL_FORMAT) -> GrammarSpec | None:
    """``tool_call_grammar`` for a request's ``tools`` and ``tool_choice`` (absent → auto)."""
    choice = request.tool_choice
    return tool_call_grammar(
        request.tools or (),
        choice=getattr(choice, "type", None) or "auto",
        forced_name=getattr(choice, "name", None),
        parallel=not getattr(choice, "disable_parallel_tool_use", None),
        tool_format=tool_format,
    )


def thinking_budget(
    close_marker: str | None, budget_tokens: int | None, tokenizer: Any, *,
    open_marker: str | None = None, starts_open: bool = False,
) -> ThinkingBudget | None:
    """The engine's ``ThinkingBudget`` for a model's markers (None without a close marker).
    ``budget_tokens`` None: nothing is forced, thinking is only tracked."""
    if not close_marker:
        return None
    return ThinkingBudget(
        close_ids=tuple(tokenizer.encode(close_marker)),
        budget_tokens=None if budget_tokens is None else max(0, budget_tokens),
        open_ids=tuple(tokenizer.encode(open_marker)) if open_marker else (),
        starts_open=starts_open,
    )


def decoding_constraints(prompt: RenderedPrompt, tokenizer: Any) -> tuple[GrammarSpec | None, ThinkingBudget | None]:
    """What the engine enforces for ``prompt``: the grammar of its tool calls and of a
    structured answer (``output_config.format``; none when the model continues a prefill:
    the grammar describes a whole answer) and its thinking budget
    (also without a budget while a grammar is in force, so the grammar waits for thinking)."""
    from pensieve.chat.output_format import answer_content, answer_grammar  # it imports this module

    plan = prompt.tools
    grammar = None
    schema = None if prompt.prefill else prompt.output_schema
    if plan is not None and not prompt.prefill:
        wants = schema is not None and plan.choice == "auto" and grammar_available()
        answer = answer_content(schema) if wants else None
        grammar = tool_call_grammar(plan.tools, choice=plan.choice, forced_name=plan.forced_name,
                                    parallel=plan.parallel, tool_format=plan.format, answer=answer,
                                    thinking=prompt.thinking.enabled)
    elif schema is not None:
        grammar = answer_grammar(schema)
    thinking = prompt.thinking
    budget = thinking.budget_tokens if thinking.enabled else None
    if thinking.markers is None or (budget is None and grammar is None):
        return grammar, None
    return grammar, thinking_budget(thinking.close_marker, budget, tokenizer,
                                    open_marker=thinking.open_marker, starts_open=thinking.starts_open)


def arguments_content(schema: Mapping[str, Any] | bool, style: ArgumentsStyle = "json") -> dict[str, Any] | None:
    """The structural-tag content that matches a tool's arguments written in ``style``
    (None: xgrammar compiles not even an object)."""
    if style == "qwen_xml":
        usable = _xml_schema(json.dumps(schema))
        return None if usable is None else qwen_xml_content(usable)
    if style == "glm_xml":
        usable = _glm_schema(json.dumps(schema))
        return None if usable is None else glm_xml_content(usable)
    if style == "gemma":
        usable = _gemma_schema(json.dumps(sorted_properties(schema)))
        return None if usable is None else gemma_content(usable)
    ebnf = arguments_ebnf(schema)
    return None if ebnf is None else {"type": "grammar", "grammar": ebnf}


def arguments_ebnf(schema: Mapping[str, Any] | bool) -> str | None:
    """EBNF of a tool's arguments; ``schema`` degraded as needed (None: not even an object)."""
    return _arguments_ebnf(json.dumps(schema))  # key order kept: properties come out in it


@functools.lru_cache(maxsize=1024)
def _arguments_ebnf(schema_json: str) -> str | None:
    schema = json.loads(schema_json)
    usable, dropped = degrade_schema(schema, _compiles)
    if usable is None:
        return None
    if dropped:
        title = schema.get("title", "") if isinstance(schema, dict) else ""
        log.warning("tool schema %s: dropped %s, which xgrammar cannot compile",
                    title or schema_json[:80], ", ".join(dropped))
    return json_schema_ebnf(usable)


def _degraded(schema_json: str, compiles: Any, what: str) -> Any | None:
    """The schema, degraded until ``compiles`` accepts it (None: not even an object, or an
    xgrammar without that style); what was dropped is logged."""
    schema = json.loads(schema_json)
    usable, dropped = degrade_schema(schema, compiles)
    if dropped and usable is not None:
        title = schema.get("title", "") if isinstance(schema, dict) else ""
        log.warning("tool schema %s: dropped %s, which xgrammar cannot compile as %s",
                    title or schema_json[:80], ", ".join(dropped), what)
    return usable


@functools.lru_cache(maxsize=1024)
def _xml_schema(schema_json: str) -> Any | None:
    """The schema, degraded until xgrammar builds Qwen XML parameters for it."""
    return _degraded(schema_json, _compiles_xml, "XML parameters")


@functools.lru_cache(maxsize=1024)
def _glm_schema(schema_json: str) -> Any | None:
    """The schema, degraded until xgrammar builds GLM key/value pairs for it."""
    return _degraded(schema_json, _compiles_glm, "GLM arguments")


@functools.lru_cache(maxsize=1024)
def _gemma_schema(schema_json: str) -> Any | None:
    """The schema, degraded until xgrammar builds Gemma 4 arguments for it."""
    return _degraded(schema_json, _compiles_gemma, "Gemma 4 arguments")


def gemma_content(schema: Any) -> dict[str, Any]:
    """Gemma 4 arguments (``{key:<|"|>text<|"|>,n:5}``) that match ``schema`` (no ``excludes``
    for the markers: xgrammar drops a string's length limits where they are set)."""
    return {"type": "json_schema", "json_schema": schema, "style": "gemma"}


def sorted_properties(schema: Any) -> Any:
    """``schema`` with every ``properties`` map in key order: Gemma 4's template writes
    arguments sorted (``dictsort``), so the grammar asks for them in that order."""
    if isinstance(schema, list):
        return [sorted_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: sorted_properties(v) if k != "enum" and k != "const" else v for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: sorted_properties(schema["properties"][k]) for k in sorted(schema["properties"])}
    return out


def _compiles_gemma(schema: Any) -> bool:
    try:
        check_structural_tag(gemma_content(schema))
    except GrammarError as exc:
        log.debug("schema does not compile as Gemma 4 arguments: %s", exc)
        return False
    return True


def glm_xml_content(schema: Any) -> dict[str, Any]:
    """GLM arguments (``<arg_key>k</arg_key><arg_value>v</arg_value>``) that match ``schema``:
    string values raw, others JSON (xgrammar's ``glm_xml`` style)."""
    return {"type": "json_schema", "json_schema": schema, "style": "glm_xml"}


def _compiles_glm(schema: Any) -> bool:
    try:
        check_structural_tag(glm_xml_content(schema))
    except GrammarError as exc:
        log.debug("schema does not compile as GLM arguments: %s", exc)
        return False
    return True


def qwen_xml_content(schema: Any) -> dict[str, Any]:
    """Qwen XML parameters (``<parameter=key>value</parameter>``) that match ``schema``."""
    if qwen_xml_style_supported():
        return {"type": "json_schema", "json_schema": schema, "style": "qwen_xml"}
    return {"type": "qwen_xml_parameter", "json_schema": schema}  # xgrammar 0.2.8's name


@functools.cache
def qwen_xml_style_supported() -> bool:
    try:
        check_structural_tag({"type": "json_schema", "json_schema": {"type": "object"}, "style": "qwen_xml"})
    except GrammarError:
        return False
    return True


def _compiles_xml(schema: Any) -> bool:
    try:
        check_structural_tag(qwen_xml_content(schema))
    except GrammarError as exc:
        log.debug("schema does not compile as XML parameters: %s", exc)
        return False
    return True


def _compiles(schema: Any) -> bool:
    try:
        json_schema_ebnf(schema)
    except GrammarError as exc:
        log.debug("schema does not compile: %s", exc)
        return False
    return True


# What to drop, in order, when a schema does not compile: first the keywords that least change
# what a valid value looks like. Within a stage each keyword alone is tried before all of them.
DROP_STAGES: tuple[tuple[str, ...], ...] = (
    ("pattern", "format", "patternProperties", "propertyNames"),
    ("$ref",),
    ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies",
     "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems",
     "uniqueItems"),
    ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
     "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"),
    ("additionalProperties", "additionalItems", "prefixItems", "items"),
    ("allOf", "anyOf", "oneOf", "enum", "const", "type", "required"),
)
FALLBACK_SCHEMA: dict[str, Any] = {"type": "object"}


def degrade_schema(schema: Any, compiles: Callable[[Any], bool]) -> tuple[Any | None, tuple[str, ...]]:
    """``schema`` itself if it compiles, else with keywords dropped until it does.

    Returns the usable schema (``{"type": "object"}`` as a last resort, None if even that
    fails) and the keywords dropped.
    """
    if compiles(schema):
        return schema, ()
    current, dropped = schema, []
    for stage in DROP_STAGES:
        present = [k for k in stage if k in schema_keywords(current)]
        for keyword in present:
            candidate = drop_keywords(current, {keyword})
            if compiles(candidate):
                return candidate, (*dropped, keyword)
        if present:
            current = drop_keywords(current, set(present))
            dropped += present
            if compiles(current):
                return current, tuple(dropped)
    if compiles(FALLBACK_SCHEMA):
        return FALLBACK_SCHEMA, ("everything but type: object",)
    return None, ("everything",)


# Where JSON Schema nests subschemas (everything else — enum, const, default — is data).
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_VALUES = frozenset({"items", "additionalProperties", "additionalItems", "contains", "not",
                            "if", "then", "else", "propertyNames", "unevaluatedProperties",
                            "unevaluatedItems"})


def _subschemas(key: str, value: Any) -> Iterable[Any]:
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return value.values()
    if (key in _SCHEMA_LISTS or key == "items") and isinstance(value, list):
        return value
    if key in _SCHEMA_VALUES:
        return (value,)
    return ()


def schema_keywords(schema: Any) -> set[str]:
    """Every keyword used anywhere in ``schema`` (property names are not keywords)."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key, value in schema.items():
        for sub in _subschemas(key, value):
            found |= schema_keywords(sub)
    return found


def drop_keywords(schema: Any, names: set[str]) -> Any:
    """``schema`` without the keywords ``names``, at every depth."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in names:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {n: drop_keywords(s, names) for n, s in value.items()}
        elif (key in _SCHEMA_LISTS or key == "items") and isinstance(value, list):
            value = [drop_keywords(s, names) for s in value]
        elif key in _SCHEMA_VALUES:
            value = drop_keywords(value, names)
        out[key] = value
    return out
