"""GLM's XML tool calls (``<tool_call>NAME<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>``):
GLM-4.7's compact layout and GLM-4.5/4.6's newlines read at every split, values typed by the
tool's schema, ``<think>`` reasoning before a call, and the grammar (xgrammar's ``glm_xml``) on
a vocabulary with GLM's special tokens."""

from __future__ import annotations

import json

import pytest

from pensieve.chat.segmenter import ThinkingMarkers
from pensieve.chat.segments import TextSegment, ThinkingSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.stream import make_segmenter
from pensieve.chat.thinking import ThinkingPlan
from pensieve.chat.tools_prompt import ToolsPlan
from pensieve.protocol import ToolParam

SCHEMA = {"type": "object", "properties": {
    "command": {"type": "string"}, "timeout": {"type": "integer"}, "background": {"type": "boolean"},
    "paths": {"type": "array", "items": {"type": "string"}}, "env": {"type": "object"},
    "note": {"type": "string"}}, "required": ["command"], "additionalProperties": False}
BASH = ToolParam(name="Bash", input_schema=SCHEMA)
READ = ToolParam(name="Read", input_schema={"type": "object", "properties": {"file_path": {"type": "string"}},
                                            "required": ["file_path"]})
TOOLS = ToolsPlan("glm", (BASH, READ), native=True)
ARGS = {"command": 'grep -n "x < 5" a.py\necho {}', "timeout": 5, "background": False,
        "paths": ["a b", "c"], "env": {"K": 1}, "note": "42"}  # a string that looks like JSON stays a string


def value(v: object) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def glm47(name: str, args: dict) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{value(v)}</arg_value>" for k, v in args.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


def glm46(name: str, args: dict) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{value(v)}</arg_value>\n" for k, v in args.items())
    return f"\n<tool_call>{name}\n{pairs}</tool_call>"


def segment(pieces: list[str], *, thinking: bool = False) -> tuple[str, str, list[tuple[str, dict, bool]]]:
    plan = ThinkingPlan(requested=True, markers=ThinkingMarkers(), starts_open=thinking)
    seg = make_segmenter(TOOLS, plan)
    out = [s for p in pieces for s in seg.feed(p)] + seg.finish()
    thought, text, calls, name, args = [], [], [], "", ""
    for s in out:
        if isinstance(s, ThinkingSegment):
            thought.append(s.text)
        elif isinstance(s, TextSegment):
            text.append(s.text)
        elif isinstance(s, ToolCallStart):
            name, args = s.name, ""
        elif isinstance(s, ToolCallDelta):
            args += s.partial_json
        elif isinstance(s, ToolCallEnd):
            calls.append((name, json.loads(args), s.complete))
    return "".join(thought), "".join(text), calls


CASES = [
    (glm47("Bash", ARGS), False, ("", "", [("Bash", ARGS, True)])),
    (glm46("Bash", ARGS), False, ("", "", [("Bash", ARGS, True)])),
    ("Let me look." + glm47("Read", {"file_path": "/a b"}) + glm47("Bash", {"command": "ls"}), False,
     ("", "Let me look.", [("Read", {"file_path": "/a b"}, True), ("Bash", {"command": "ls"}, True)])),
    ("The user wants files.</think>" + glm47("Bash", {"command": "ls"}), True,
     ("The user wants files.", "", [("Bash", {"command": "ls"}, True)])),
    ("<tool_call>Read</tool_call>", False, ("", "", [("Read", {}, True)])),
]


@pytest.mark.parametrize(("text", "thinking", "want"), CASES)
def test_calls_read_at_every_split(text: str, thinking: bool, want: tuple) -> None:
    assert segment([text], thinking=thinking) == want
    assert segment(list(text), thinking=thinking) == want
    for cut in range(1, len(text)):
        assert segment([text[:cut], text[cut:]], thinking=thinking) == want, cut


def test_string_values_stream_as_they_are_written() -> None:
    seg = make_segmenter(TOOLS, None)
    pieces = ["<tool_call>Bash<arg_key>command</arg_key><arg_value>ls ", "-la /tmp", "</arg_value></tool_call>"]
    deltas = [[s.partial_json for s in seg.feed(p) if isinstance(s, ToolCallDelta)] for p in pieces]
    assert deltas[0] == ["{", '"command": "', "ls "] and deltas[1] == ["-la /tmp"]


def test_not_a_call_stays_text_and_a_cut_call_is_repaired() -> None:
    hermes_like = 'See <tool_call>{"name": "Bash"} here'
    assert segment([hermes_like]) == ("", hermes_like, [])
    cut = glm47("Bash", {"command": "ls", "timeout": 5})[:-30]  # inside the timeout's key
    assert segment([cut]) == ("", "", [("Bash", {"command": "ls"}, False)])


# -- the grammar -----------------------------------------------------------------------------

xgr = pytest.importorskip("xgrammar")
from tests.helpers.special_vocab import grammar_accepts  # noqa: E402


@pytest.fixture(scope="module")
def compiler():
    from pensieve.engine.grammar import GrammarCompiler
    from tests.helpers.special_vocab import glm_tokenizer

    tok = glm_tokenizer()
    return tok, GrammarCompiler(tok, tok.vocab_size)


accepts = grammar_accepts  # tests/helpers/special_vocab.py


def grammar(choice: str = "any", name: str | None = None, parallel: bool = True):
    from pensieve.chat.tool_grammar import tool_call_grammar

    spec = tool_call_grammar([BASH, READ], choice=choice, forced_name=name, parallel=parallel, tool_format="glm")
    assert spec is not None
    return spec


def test_glm_markers_are_single_tokens(compiler) -> None:
    tok, _ = compiler
    assert len(tok.encode("<tool_call><arg_key></arg_key><arg_value></arg_value></tool_call>")) == 6


def test_forced_grammar_takes_both_layouts_and_refuses_invalid_calls(compiler) -> None:
    spec = grammar()
    args = {k: ARGS[k] for k in ("command", "timeout", "background", "paths")}
    assert accepts(compiler, spec, glm47("Bash", args))
    assert accepts(compiler, spec, glm46("Bash", args).lstrip("\n"))
    assert not accepts(compiler, spec, "")
    assert not accepts(compiler, spec, "Sure." + glm47("Bash", args), complete=False)
    for bad in (glm47("Write", args), glm47("Bash", {"timeout": 5}),
                glm47("Bash", {"command": "ls", "timeout": "soon"}), glm47("Bash", {"command": "ls", "user": "x"}),
                glm47("Bash", {"command": "ls", "paths": "a"})):
        assert not accepts(compiler, spec, bad, complete=False), bad


def test_auto_and_single_call_grammars(compiler) -> None:
    call = glm47("Read", {"file_path": "/x"})
    assert accepts(compiler, grammar("auto"), "No tool needed.")
    assert accepts(compiler, grammar("auto"), "Reading." + call)
    assert not accepts(compiler, grammar("auto"), "Reading." + glm47("Read", {}), complete=False)
    single = grammar("tool", "Read", parallel=False)
    assert accepts(compiler, single, call)
    assert not accepts(compiler, single, call + "\n" + call, complete=False)


def test_what_the_grammar_accepts_the_parser_reads_back(compiler) -> None:
    args = {"command": "ls -la", "timeout": 5, "paths": ["a"]}
    text = glm47("Bash", args) + "\n" + glm47("Read", {"file_path": "/x"})
    assert accepts(compiler, grammar(), text)
    assert segment(list(text)) == ("", "", [("Bash", args, True), ("Read", {"file_path": "/x"}, True)])


def test_constrained_values_lose_the_padding_their_grammar_allows() -> None:
    schema = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "kelvin"]},
                                               "code": {"type": "string", "pattern": "^[0-9]+$"},
                                               "days": {"type": "integer"}, "text": {"type": "string"}}}
    seg = make_segmenter(ToolsPlan("glm", (ToolParam(name="W", input_schema=schema),)), None)
    text = ("<tool_call>W<arg_key>unit</arg_key><arg_value>celsius </arg_value><arg_key>code</arg_key>"
            "<arg_value>\n007</arg_value><arg_key>days</arg_key><arg_value> 3\n</arg_value>"
            "<arg_key>text</arg_key><arg_value> keep me\n</arg_value></tool_call>")
    args = "".join(s.partial_json for s in seg.feed(text) + seg.finish() if isinstance(s, ToolCallDelta))
    assert json.loads(args) == {"unit": "celsius", "code": "007", "days": 3, "text": " keep me\n"}
