"""tool_choice → grammar: the Hermes call shape, the modes, schema degradation, and every one
of Claude Code's 24 tool schemas compiling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

xgr = pytest.importorskip("xgrammar")

from pensieve.chat import tool_grammar as tg  # noqa: E402
from pensieve.chat.tool_grammar import (  # noqa: E402
    arguments_ebnf,
    degrade_schema,
    drop_keywords,
    request_tool_grammar,
    schema_keywords,
    thinking_budget,
    tool_call_grammar,
)
from pensieve.engine import grammar as grammar_mod  # noqa: E402
from pensieve.engine.grammar import GrammarCompiler, GrammarUnavailableError  # noqa: E402
from pensieve.loaders.tokenizer import TextTokenizer  # noqa: E402
from pensieve.protocol import MessageCreateParams, ToolParam  # noqa: E402
from tests.unit.loader_fixtures import tiny_bpe_tokenizer  # noqa: E402
from tests.unit.test_loader_tokenizer import bpe_metadata  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "claude_code_request.json"
BASH = ToolParam(name="Bash", input_schema={
    "type": "object",
    "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
    "required": ["command"], "additionalProperties": False})
READ = ToolParam(name="Read", input_schema={
    "type": "object", "properties": {"file_path": {"type": "string"}},
    "required": ["file_path"], "additionalProperties": False})
CALL_BASH = '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>'
CALL_READ = '<tool_call>\n{"name": "Read", "arguments": {"file_path": "/a"}}\n</tool_call>'


@pytest.fixture(scope="module")
def compiler():
    tok = TextTokenizer.from_gguf_metadata(bpe_metadata(tiny_bpe_tokenizer()))
    return GrammarCompiler(tok, tok.vocab_size)


@pytest.fixture(scope="module")
def claude_code_tools() -> list[ToolParam]:
    body = json.loads(FIXTURE.read_text())
    return [t for t in MessageCreateParams.model_validate(body).tools if isinstance(t, ToolParam)]


def accepts(compiler, spec, text: str, *, complete: bool = True) -> bool:
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    return matcher.accept_string(text) and (matcher.is_completed() or not complete)


def test_forced_tool_accepts_exactly_the_canonical_hermes_call(compiler):
    spec = tool_call_grammar([BASH, READ], choice="tool", forced_name="Bash")
    assert accepts(compiler, spec, CALL_BASH)
    assert accepts(compiler, spec, CALL_BASH + "\n" + CALL_BASH)  # parallel calls allowed
    assert not accepts(compiler, spec, CALL_READ, complete=False)  # only the named tool
    for off in ('<tool_call>\n{"name": "Bash", "arguments": {"command":"ls"}}',  # spacing
                '<tool_call>\n{"name": "Bash", "arguments": {"cmd": "ls"}}',  # unknown key
                '<tool_call>\n{"name": "Bash", "arguments": {}}',  # required key missing
                'Sure! ' + CALL_BASH):  # no text before a forced call
        assert not accepts(compiler, spec, off, complete=False), off


def test_any_allows_every_offered_tool_and_requires_a_call(compiler):
    spec = tool_call_grammar([BASH, READ], choice="any")
    assert accepts(compiler, spec, CALL_READ + "\n" + CALL_BASH)
    assert not accepts(compiler, spec, "")
    assert not accepts(compiler, spec, '<tool_call>\n{"name": "Write"', complete=False)


def test_disable_parallel_ends_the_turn_after_one_call(compiler):
    spec = tool_call_grammar([BASH, READ], choice="any", parallel=False)
    matcher = xgr.GrammarMatcher(compiler.compile(spec))
    assert matcher.accept_string(CALL_BASH) and matcher.is_completed()
    assert not matcher.accept_string("\n<")


def test_auto_lets_text_through_and_constrains_an_opened_call(compiler):
    spec = tool_call_grammar([BASH, READ])
    assert accepts(compiler, spec, "Let me look. " + CALL_READ + "\nDone.")
    assert accepts(compiler, spec, "No tools needed.")
    assert not accepts(compiler, spec, 'Hmm <tool_call>\n{"name": "rm"', complete=False)
    assert not accepts(compiler, spec, '<tool_call>\n{"name": "Bash", "arguments": {"x": 1}', complete=False)


def test_no_grammar_for_none_no_tools_or_an_unknown_format(caplog):
    assert tool_call_grammar([BASH], choice="none") is None
    assert tool_call_grammar([]) is None
    with caplog.at_level(logging.WARNING):
        assert tool_call_grammar([BASH], tool_format="no_such_format") is None
    assert "no_such_format" in caplog.text


def test_a_forced_name_not_offered_falls_back_to_any(caplog):
    spec = tool_call_grammar([BASH, READ], choice="tool", forced_name="Write")
    assert spec == tool_call_grammar([BASH, READ], choice="any")
    assert "Write" in caplog.text


def test_request_tool_grammar_reads_tool_choice():
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            "tools": [BASH.model_dump(exclude_none=True), READ.model_dump(exclude_none=True)]}
    req = lambda choice: MessageCreateParams.model_validate(base | ({"tool_choice": choice} if choice else {}))  # noqa: E731
    assert request_tool_grammar(req(None)) == tool_call_grammar([BASH, READ])
    assert request_tool_grammar(req({"type": "none"})) is None
    assert request_tool_grammar(req({"type": "tool", "name": "Read", "disable_parallel_tool_use": True})) == \
        tool_call_grammar([BASH, READ], choice="tool", forced_name="Read", parallel=False)
    assert request_tool_grammar(req({"type": "some_new_mode"})) == tool_call_grammar([BASH, READ])


def test_without_xgrammar_auto_is_unconstrained_and_forced_fails_clearly(monkeypatch):
    monkeypatch.setattr(grammar_mod, "xgr", None)
    assert tool_call_grammar([BASH]) is None
    with pytest.raises(GrammarUnavailableError, match="xgrammar"):
        tool_call_grammar([BASH], choice="any")


def test_every_claude_code_tool_schema_compiles_unchanged(claude_code_tools, compiler, caplog):
    assert len(claude_code_tools) == 24
    with caplog.at_level(logging.WARNING):
        for tool in claude_code_tools:
            assert arguments_ebnf(tool.input_schema) is not None, tool.name
    assert "dropped" not in caplog.text
    for choice in ("auto", "any"):
        spec = tool_call_grammar(claude_code_tools, choice=choice)
        assert compiler.compile(spec) is not None


# --- degradation ---------------------------------------------------------------------------

def test_degrade_drops_only_the_offending_keyword():
    schema = {"type": "object", "properties": {
        "pattern": {"type": "string", "pattern": "(a)\\1", "maxLength": 5},  # a property named "pattern"
        "kind": {"enum": [{"format": "x"}]}}}  # enum values are data, not schemas
    compiles = lambda s: "pattern" not in schema_keywords(s)  # noqa: E731
    usable, dropped = degrade_schema(schema, compiles)
    assert dropped == ("pattern",)
    assert usable["properties"]["pattern"] == {"type": "string", "maxLength": 5}
    assert usable["properties"]["kind"] == {"enum": [{"format": "x"}]}


def test_degrade_falls_back_to_an_object_then_to_nothing():
    assert degrade_schema({"type": "strng"}, lambda s: s == {"type": "object"}) == (
        {"type": "object"}, ("everything but type: object",))
    assert degrade_schema({"x": 1}, lambda s: False) == (None, ("everything",))


def test_keywords_are_found_and_dropped_at_every_depth():
    schema = {"type": "object", "$defs": {"d": {"type": "string", "format": "email"}},
              "properties": {"a": {"type": "array", "items": {"anyOf": [{"not": {"type": "null"}}]}}}}
    assert {"format", "not", "anyOf", "items", "$defs"} <= schema_keywords(schema)
    assert "properties" in schema_keywords(schema) and "a" not in schema_keywords(schema)
    dropped = drop_keywords(schema, {"format", "not"})
    assert dropped["$defs"]["d"] == {"type": "string"}
    assert dropped["properties"]["a"]["items"]["anyOf"] == [{}]


@pytest.mark.parametrize("bad, keyword", [
    ({"type": "string", "pattern": "(a)\\1"}, "pattern"),  # backreference
    ({"$ref": "#/definitions/nope"}, "$ref"),  # unresolvable reference
    ({"type": "integer", "minimum": 10, "maximum": 1}, "minimum"),  # empty range
    ({"type": "string", "minLength": 10, "maxLength": 1}, "minLength"),
    ({"type": "object", "additionalProperties": "yes"}, "additionalProperties"),
])
def test_real_schemas_xgrammar_rejects_degrade_and_are_logged(bad, keyword, caplog, compiler):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "bad": bad},
              "required": ["ok"], "title": f"with {keyword}"}
    with caplog.at_level(logging.WARNING):
        spec = tool_call_grammar([ToolParam(name="T", input_schema=schema)], choice="any")
    assert f"dropped {keyword}" in caplog.text and f"with {keyword}" in caplog.text
    assert accepts(compiler, spec, '<tool_call>\n{"name": "T", "arguments": {"ok": true}}\n</tool_call>')


def test_a_schema_that_degrades_to_nothing_disables_the_grammar(monkeypatch, caplog):
    monkeypatch.setattr(tg, "_compiles", lambda schema: False)
    tg._arguments_ebnf.cache_clear()
    try:
        assert tool_call_grammar([ToolParam(name="Z", input_schema={"type": "object", "z": 1})], choice="any") is None
    finally:
        tg._arguments_ebnf.cache_clear()
    assert "not constrained" in caplog.text


def test_thinking_budget_from_markers():
    class Tok:
        def encode(self, text):
            return [ord(c) for c in text]

    budget = thinking_budget("</t>", 64, Tok(), open_marker="<t>", starts_open=True)
    assert budget.close_ids == (60, 47, 116, 62) and budget.open_ids == (60, 116, 62)
    assert budget.budget_tokens == 64 and budget.starts_open
    assert thinking_budget("</t>", None, Tok()).budget_tokens is None  # tracked, never forced
    assert thinking_budget(None, 10, Tok()) is None


class CharTok:
    def encode(self, text):
        return [ord(c) for c in text]


def rendered(tools=None, thinking=None, prefill=""):
    from pensieve.chat.prompt import RenderedPrompt
    from pensieve.chat.thinking import ThinkingPlan

    return RenderedPrompt("", [1], prefill, tools, thinking or ThinkingPlan())


def test_decoding_constraints_from_the_prompt_plans():
    from pensieve.chat.segmenter import ThinkingMarkers
    from pensieve.chat.thinking import ThinkingPlan
    from pensieve.chat.tools_prompt import ToolsPlan

    plan = ToolsPlan("hermes", (BASH, READ), "tool", "Read", parallel=False)
    grammar, budget = tg.decoding_constraints(rendered(plan), CharTok())
    assert grammar == tool_call_grammar([BASH, READ], choice="tool", forced_name="Read", parallel=False)
    assert budget is None  # no reasoning markers
    assert tg.decoding_constraints(rendered(plan, prefill="Sure"), CharTok()) == (None, None)
    assert tg.decoding_constraints(rendered(), CharTok()) == (None, None)

    thinks = ThinkingPlan(requested=True, markers=ThinkingMarkers(), budget_tokens=100, starts_open=True)
    grammar, budget = tg.decoding_constraints(rendered(None, thinks), CharTok())
    assert grammar is None and budget.budget_tokens == 100 and budget.starts_open
    assert budget.close_ids == tuple(map(ord, "</think>")) and budget.open_ids == tuple(map(ord, "<think>"))
    # markers without a requested budget: tracked only while a grammar is in force
    quiet = ThinkingPlan(requested=False, markers=ThinkingMarkers())
    assert tg.decoding_constraints(rendered(None, quiet), CharTok()) == (None, None)
    grammar, budget = tg.decoding_constraints(rendered(plan, quiet), CharTok())
    assert grammar is not None and budget.budget_tokens is None
