"""Gemma 4's tool calls (``<|tool_call>call:NAME{key:<|"|>text<|"|>,n:5}<tool_call|>``): its
object syntax read as JSON at every split, the end of the turn at ``<|tool_response>``, and the
grammar (xgrammar's ``gemma`` style, arguments in the template's sorted key order) on a
vocabulary where ``<|"|>`` is one token — which also closes a string when tokens run low."""

from __future__ import annotations

import json

import pytest

from pensieve.chat.segments import TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.stream import make_segmenter
from pensieve.chat.tools_prompt import ToolsPlan
from pensieve.protocol import ToolParam

SCHEMA = {"type": "object", "properties": {
    "timeout": {"type": "integer"}, "command": {"type": "string"}, "env": {"type": "object"},
    "paths": {"type": "array", "items": {"type": "string"}}, "dry": {"type": "boolean"}},
    "required": ["command"], "additionalProperties": False}
BASH = ToolParam(name="Bash", input_schema=SCHEMA)
TOOLS = ToolsPlan("gemma4", (BASH,), native=True)
Q = '<|"|>'
CALL = (f"<|tool_call>call:Bash{{command:{Q}grep -n \"x\" a.py\n{Q},dry:false,env:{{K:{Q}v{Q},N:[1,2.5]}},"
        f"paths:[{Q}a b{Q},{Q}c{Q}],timeout:-5}}<tool_call|>")
ARGS = {"command": 'grep -n "x" a.py\n', "dry": False, "env": {"K": "v", "N": [1, 2.5]}, "paths": ["a b", "c"],
        "timeout": -5}


def segment(pieces: list[str]) -> tuple[str, list[tuple[str, dict, bool]], bool]:
    seg = make_segmenter(TOOLS, None)
    out = [s for p in pieces for s in seg.feed(p)] + seg.finish()
    text, calls, name, args = [], [], "", ""
    for s in out:
        if isinstance(s, TextSegment):
            text.append(s.text)
        elif isinstance(s, ToolCallStart):
            name, args = s.name, ""
        elif isinstance(s, ToolCallDelta):
            args += s.partial_json
        elif isinstance(s, ToolCallEnd):
            calls.append((name, json.loads(args), s.complete))
    return "".join(text), calls, seg.done


@pytest.mark.parametrize("text", ["Let me grep." + CALL + "<|tool_response>response:Bash{value:1}", CALL + CALL])
def test_calls_read_at_every_split(text: str) -> None:
    want = segment([text])
    assert want[1][0] == ("Bash", ARGS, True)
    assert segment(list(text)) == want
    for cut in range(1, len(text)):
        assert segment([text[:cut], text[cut:]]) == want, cut


def test_the_turn_ends_where_the_model_writes_the_result_itself() -> None:
    text, calls, done = segment(["Let me grep." + CALL + "<|tool_response>response:Bash{value:1}"])
    assert (text, len(calls), done) == ("Let me grep.", 1, True)


def test_not_a_call_stays_text_and_a_cut_call_is_repaired() -> None:
    assert segment(["see <|tool_call>nope"]) == ("see <|tool_call>nope", [], False)
    text, calls, _ = segment([CALL[: CALL.index("N:") + 4]])  # inside env's N, a number not yet ended
    assert calls == [("Bash", {"command": 'grep -n "x" a.py\n', "dry": False, "env": {"K": "v", "N": []}}, False)]


def test_keys_may_also_come_quoted() -> None:
    quoted = f"<|tool_call>call:Bash{{{Q}command{Q}:{Q}ls{Q},env:{{{Q}K{Q}:1}}}}<tool_call|>"
    assert segment(list(quoted)) == ("", [("Bash", {"command": "ls", "env": {"K": 1}}, True)], False)


xgr = pytest.importorskip("xgrammar")
from tests.helpers.special_vocab import grammar_accepts  # noqa: E402


@pytest.fixture(scope="module")
def compiler():
    from pensieve.engine.grammar import GrammarCompiler
    from tests.helpers.special_vocab import gemma4_tokenizer

    tok = gemma4_tokenizer()
    return tok, GrammarCompiler(tok, tok.vocab_size)


accepts = grammar_accepts  # tests/helpers/special_vocab.py


def grammar(choice: str = "any"):
    from pensieve.chat.tool_grammar import tool_call_grammar

    spec = tool_call_grammar([BASH], choice=choice, tool_format="gemma4")
    assert spec is not None
    return spec


def test_grammar_takes_the_template_s_sorted_keys_and_refuses_invalid_calls(compiler) -> None:
    assert accepts(compiler, grammar(), CALL)
    assert accepts(compiler, grammar("auto"), "Sure. " + CALL)
    for bad in (CALL.replace("call:Bash", "call:Write"), CALL.replace("timeout:-5", f"timeout:{Q}5{Q}"),
                CALL.replace("dry:false,", "dry:false,user:1,"),
                f"<|tool_call>call:Bash{{timeout:5,command:{Q}ls{Q}}}<tool_call|>"):  # not in sorted order
        assert not accepts(compiler, grammar(), bad, complete=False), bad


def test_the_string_delimiter_token_closes_a_string_when_tokens_run_low(compiler) -> None:
    tok, comp = compiler
    comp.compile(grammar())  # builds the vocabulary tables
    quote = tok.backend.token_to_id(Q)
    word, bit = divmod(quote, 32)
    assert int(comp.close_string_bits[word]) >> bit & 1
