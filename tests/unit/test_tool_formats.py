"""Tool-call formats (``pensieve.chat.tool_formats``): each format's parser reads its calls
however the text is split, each format's grammar accepts a valid call and refuses invalid
ones under every tool_choice, what the grammar accepts the parser reads back, and the real
templates llama.cpp ships pick the right format (or the built-in prompt)."""

from __future__ import annotations

import json
import os

import pytest

from pensieve.chat import PromptRenderer
from pensieve.chat.segmenter import Segmenter
from pensieve.chat.segments import TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.template import ChatTemplate
from pensieve.chat.tool_formats import TOOL_FORMATS, detect_tool_format, get_tool_format, make_tool_parser
from pensieve.protocol import ToolParam
from tests.helpers.api_fakes import CharTokenizer
from tests.unit.test_chat_template_parity import real_templates_dir

BASH_SCHEMA = {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
               "required": ["command"], "additionalProperties": False}
READ_SCHEMA = {"type": "object", "properties": {"file_path": {"type": "string"}},
               "required": ["file_path"], "additionalProperties": False}
SCHEMAS = {"Bash": BASH_SCHEMA, "Read": READ_SCHEMA}
BASH = ToolParam(name="Bash", input_schema=BASH_SCHEMA)
READ = ToolParam(name="Read", input_schema=READ_SCHEMA)
BASH_ARGS = {"command": 'ls -la "my dir" <x>', "timeout": 5}
READ_ARGS = {"file_path": "/tmp/a b.txt"}


def json_args(args: dict) -> str:
    return json.dumps(args, ensure_ascii=False)


def xml_args(args: dict) -> str:
    return "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())


def gemma_value(v: object) -> str:
    if isinstance(v, str):
        return f'<|"|>{v}<|"|>'
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{gemma_value(x)}" for k, x in sorted(v.items())) + "}"
    if isinstance(v, list):
        return "[" + ",".join(gemma_value(x) for x in v) + "]"
    return json.dumps(v)


def glm_args(args: dict) -> str:
    return "".join(f"<arg_key>{k}</arg_key><arg_value>{v if isinstance(v, str) else json.dumps(v)}</arg_value>"
                   for k, v in args.items())


# The text each format's grammar lays out for one call (name, arguments).
CALL_TEXT = {
    "hermes": lambda n, a: f'<tool_call>\n{{"name": "{n}", "arguments": {json_args(a)}}}\n</tool_call>',
    "qwen3_coder": lambda n, a: f"<tool_call>\n<function={n}>\n{xml_args(a)}</function>\n</tool_call>",
    "mistral": lambda n, a: f"[TOOL_CALLS]{n}[ARGS]{json_args(a)}",
    "mistral_list": lambda n, a: f'[TOOL_CALLS][{{"name": "{n}", "arguments": {json_args(a)}}}]',
    "llama3": lambda n, a: f'{{"name": "{n}", "parameters": {json_args(a)}}}',
    "json_fence": lambda n, a: f'```json\n{{"name": "{n}", "arguments": {json_args(a)}}}\n```',
    "glm": lambda n, a: f"<tool_call>{n}{glm_args(a)}</tool_call>",
    "gemma4": lambda n, a: f"<|tool_call>call:{n}{gemma_value(a)}<tool_call|>",
}
SEPARATOR = {"hermes": "\n", "qwen3_coder": "\n", "mistral": "", "llama3": "; ", "json_fence": "\n", "glm": "\n",
             "gemma4": ""}


def two_calls(fmt: str) -> str:
    if fmt == "mistral_list":
        return ('[TOOL_CALLS][{"name": "Bash", "arguments": ' + json_args(BASH_ARGS) + '}, '
                '{"name": "Read", "arguments": ' + json_args(READ_ARGS) + "}]")
    return CALL_TEXT[fmt]("Bash", BASH_ARGS) + SEPARATOR[fmt] + CALL_TEXT[fmt]("Read", READ_ARGS)


def segment(fmt: str, pieces: list[str]) -> tuple[list[tuple[str, dict, bool]], str]:
    seg = Segmenter(tool_parser=make_tool_parser(fmt, SCHEMAS))
    out = [s for piece in pieces for s in seg.feed(piece)] + seg.finish()
    calls, texts, name, args = [], [], "", ""
    for s in out:
        if isinstance(s, ToolCallStart):
            name, args = s.name, ""
        elif isinstance(s, ToolCallDelta):
            args += s.partial_json
        elif isinstance(s, ToolCallEnd):
            calls.append((name, json.loads(args or "{}"), s.complete))
        elif isinstance(s, TextSegment):
            texts.append(s.text)
    return calls, "".join(texts)


# -- parsers ---------------------------------------------------------------------------------

CASES = [(fmt, text, lead) for fmt in CALL_TEXT for text, lead in [
    (CALL_TEXT[fmt]("Bash", BASH_ARGS), ""),
    (two_calls(fmt), ""),
    ("Let me look.\n\n" + CALL_TEXT[fmt]("Read", READ_ARGS), "Let me look."),
] if not (fmt == "llama3" and lead)]  # a bare Llama call is the whole answer
CASES.append(("llama3", "<|python_tag|>" + CALL_TEXT["llama3"]("Bash", BASH_ARGS), ""))


def expected_calls(text: str) -> list[tuple[str, dict, bool]]:
    calls = [("Bash", BASH_ARGS, True)] if "Bash" in text else []
    return calls + ([("Read", READ_ARGS, True)] if "Read" in text else [])


@pytest.mark.parametrize(("fmt", "text", "lead"), CASES, ids=lambda v: v if isinstance(v, str) and len(v) < 14 else None)
def test_parser_reads_the_calls_split_at_every_character_boundary(fmt: str, text: str, lead: str) -> None:
    expected = expected_calls(text)
    assert segment(fmt, [text]) == (expected, lead)
    assert segment(fmt, list(text)) == (expected, lead)  # one character at a time
    for cut in range(1, len(text)):
        assert segment(fmt, [text[:cut], text[cut:]]) == (expected, lead), cut


def test_hermes_reads_the_json_fence_drift_but_not_other_fenced_json() -> None:
    drift = "Sure.\n```json\n" + json.dumps({"name": "Bash", "arguments": BASH_ARGS}) + "\n```"
    assert segment("hermes", list(drift)) == ([("Bash", BASH_ARGS, True)], "Sure.")
    for data in ('```json\n{"name": "Alice", "age": 3}\n```',  # a name, but no offered tool's
                 '```json\n{"city": "Paris"}\n```', "```python\nprint(1)\n```"):
        assert segment("hermes", list("Here:\n" + data)) == ([], "Here:\n" + data)


# -- grammars --------------------------------------------------------------------------------

xgr = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def compiler():
    from pensieve.engine.grammar import GrammarCompiler
    from pensieve.loaders.tokenizer import TextTokenizer
    from tests.unit.loader_fixtures import tiny_bpe_tokenizer
    from tests.unit.test_loader_tokenizer import bpe_metadata

    tok = TextTokenizer.from_gguf_metadata(bpe_metadata(tiny_bpe_tokenizer()))
    return tok, GrammarCompiler(tok, tok.vocab_size)


def accepts(compiler, spec, text: str, *, complete: bool = True) -> bool:
    """Does the grammar take ``text`` as the model would write it: token by token?"""
    tok, comp = compiler
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    matcher = xgr.GrammarMatcher(comp.compile(spec))
    return all(matcher.accept_token(i) for i in ids) and (matcher.is_completed() or not complete)


def grammar(fmt: str, choice: str = "any", name: str | None = None, parallel: bool = True):
    from pensieve.chat.tool_grammar import tool_call_grammar

    spec = tool_call_grammar([BASH, READ], choice=choice, forced_name=name, parallel=parallel, tool_format=fmt)
    assert spec is not None
    return spec


def bad_calls(fmt: str) -> list[str]:
    call = CALL_TEXT[fmt]
    return [call("Write", BASH_ARGS),  # not an offered tool
            call("Bash", {"timeout": 5}),  # the required argument missing
            call("Bash", {"command": "ls", "timeout": "soon"}),  # a string for an integer
            call("Bash", {"command": "ls", "user": "root"})]  # no additional properties


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
def test_forced_grammar_accepts_a_valid_call_and_refuses_invalid_ones(fmt: str, compiler) -> None:
    spec = grammar(fmt)
    assert accepts(compiler, spec, CALL_TEXT[fmt]("Bash", BASH_ARGS))
    assert accepts(compiler, spec, two_calls(fmt))
    assert not accepts(compiler, spec, "")  # a call is required
    assert not accepts(compiler, spec, "Sure. " + CALL_TEXT[fmt]("Bash", BASH_ARGS), complete=False)
    for bad in bad_calls(fmt):
        assert not accepts(compiler, spec, bad, complete=False), bad


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
def test_named_tool_and_single_call_grammars(fmt: str, compiler) -> None:
    spec = grammar(fmt, "tool", "Read", parallel=False)
    assert accepts(compiler, spec, CALL_TEXT[fmt]("Read", READ_ARGS))
    assert not accepts(compiler, spec, CALL_TEXT[fmt]("Bash", BASH_ARGS), complete=False)
    assert not accepts(compiler, spec, two_calls(fmt).replace("Bash", "Read", 1), complete=False)


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
def test_auto_grammar_lets_text_through_and_constrains_a_call_after_its_trigger(fmt: str, compiler) -> None:
    spec = grammar(fmt, "auto")
    lead = "" if fmt == "llama3" else "Let me look. "
    assert accepts(compiler, spec, "No tool needed, the answer is 4.")
    assert accepts(compiler, spec, lead + CALL_TEXT[fmt]("Bash", BASH_ARGS))
    for bad in bad_calls(fmt):
        assert not accepts(compiler, spec, lead + bad, complete=False), bad


@pytest.mark.parametrize("fmt", list(CALL_TEXT))
def test_what_the_grammar_accepts_the_parser_reads_back(fmt: str, compiler) -> None:
    text = two_calls(fmt)
    assert accepts(compiler, grammar(fmt), text)
    calls, rest = segment(fmt, list(text))
    assert calls == [("Bash", BASH_ARGS, True), ("Read", READ_ARGS, True)] and not rest.strip()


def test_llama3_auto_grammar_also_takes_the_python_tag(compiler) -> None:
    call = "<|python_tag|>" + CALL_TEXT["llama3"]("Bash", BASH_ARGS)
    assert accepts(compiler, grammar("llama3", "auto"), call)


def test_every_format_has_markers_a_parser_and_a_grammar() -> None:
    for name, fmt in TOOL_FORMATS.items():
        assert fmt.name == name and fmt.start_markers and fmt.end_markers
        assert fmt.make_parser(SCHEMAS).name in (name, "mistral")  # the two Mistral forms share one parser
        assert fmt.grammar.forced([("T", {"type": "grammar", "grammar": "root ::= \"{}\""})], True)
    with pytest.raises(ValueError, match="unknown tool-call format"):
        get_tool_format("nope")


# -- picking a format from the real templates ------------------------------------------------

BUILTIN = None  # the template renders no calls we parse: built-in prompt, Hermes
EXPECTED_FORMAT = {
    "Qwen-Qwen2.5-7B-Instruct": "hermes", "Qwen-Qwen3-0.6B": "hermes", "Qwen-QwQ-32B": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
    "Bielik-11B-v3.0-Instruct": "hermes", "MiMo-VL": "hermes", "Reka-Edge": "hermes",
    "ibm-granite-granite-4.0": "hermes", "ibm-granite-granite-4.1": "hermes",
    "Qwen3-Coder": "qwen3_coder", "Qwen3.5-4B": "qwen3_coder", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16": "qwen3_coder",
    "StepFun3.5-Flash": "qwen3_coder",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral", "unsloth-mistral-Devstral-Small-2507": "mistral",
    "mistralai-Ministral-3-14B-Reasoning-2512": "mistral", "mistralai-Mistral-Nemo-Instruct-2407": "mistral_list",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3", "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "GLM-4.6": "glm", "GLM-4.7-Flash": "glm", "Spark2.5": "glm", "inclusionai-ling-3.0-flash": "glm",
    "poolside-Laguna-S-2.1": "glm", "poolside-Laguna-XS-2.1": "glm", "poolside-Laguna-XS.2": "glm",
    "openai-gpt-oss-120b": "harmony", "google-gemma-4-31B-it": "gemma4", "google-gemma-4-31B-it-interleaved": "gemma4",
}
TEMPLATE_NAMES = sorted(p.stem for p in real_templates_dir().glob("*.jinja"))


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_real_template_picks_its_format(name: str) -> None:
    source = (real_templates_dir() / f"{name}.jinja").read_text()
    caps = PromptRenderer(CharTokenizer(), source, thinking_key=b"k").caps
    want = EXPECTED_FORMAT.get(name, BUILTIN)
    assert (caps.tool_format if caps.native_tools else BUILTIN) == want
    if want is None:
        assert caps.tool_format == "hermes"  # what the built-in prompt asks for
        return
    # A call as the template renders it reads back through the format's parser.
    call = {"id": "call00001", "type": "function", "function": {"name": "Bash", "arguments": BASH_ARGS}}
    template = ChatTemplate(source)
    tools = [{"type": "function", "function": {"name": n, "description": "", "parameters": s}} for n, s in SCHEMAS.items()]
    user = [{"role": "user", "content": "list files"}]
    prompt = template.render(user, tools=tools, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    full = template.render(user + [{"role": "assistant", "content": "", "tool_calls": [call]}], tools=tools,
                           add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
    cut = len(os.path.commonprefix([prompt, full]))
    while cut and full[cut - 1] not in "\n>]":  # the prompt may open what the call does (<think>)
        cut -= 1
    answer = full[cut:]
    calls, _ = segment(want, [answer])
    assert calls[:1] == [("Bash", BASH_ARGS, True)], answer


def test_source_signs_when_no_call_was_rendered() -> None:
    assert detect_tool_format(None) == "hermes"
    assert detect_tool_format("x", rendered_call="<｜tool▁call▁begin｜>Bash<｜tool▁sep｜>{}<｜tool▁call▁end｜>") is None
    assert detect_tool_format("x", rendered_call="<|tool_call>call:Bash{}<tool_call|>") == "gemma4"
    assert detect_tool_format(None, rendered_call='<tool_call>\n{"name": "x", "arguments": {}}') == "hermes"
