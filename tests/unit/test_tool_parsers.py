"""Tool-call parsers: the incremental JSON scanner, each format, the registry."""

from __future__ import annotations

import json
import random

import pytest
from jiter import from_json

from pensieve.chat.segmenter import Segmenter
from pensieve.chat.segments import TextSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.tool_formats import TOOL_FORMATS, detect_tool_format, make_tool_parser
from pensieve.chat.tool_parsers.json_scanner import JsonScanner, JsonSyntaxError

VALUES = [
    {"command": "ls -la", "timeout": 120000, "flags": [True, False, None], "nested": {"a": [], "b": {}}},
    {"text": 'quote " backslash \\ slash / tab \t unicode é 日本 🚀', "num": -0.5e-10, "zero": 0},
    {"empty": "", "list": [1, [2, [3, {"x": "y"}]]], "big": 12345678901234567890},
    [],
    "a string",
    -12.5,
]


def scan_char_by_char(text: str) -> tuple[list[str], JsonScanner]:
    scanner = JsonScanner()
    outs: list[str] = []
    for ch in text:
        assert scanner.feed(ch) == 1
        outs.append(scanner.take())
    scanner.end()
    return outs, scanner


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("indent", [None, 2])
def test_scanner_output_is_always_a_closable_prefix(value: object, indent: int | None) -> None:
    text = json.dumps(value, ensure_ascii=False, indent=indent)
    outs, scanner = scan_char_by_char(text)
    assert scanner.done and "".join(outs) == text
    # Replay: after every character, output so far + closing() is valid JSON.
    scanner = JsonScanner()
    so_far = ""
    for ch in text:
        scanner.feed(ch)
        so_far += scanner.take()
        if scanner.started and not scanner.done:
            json.loads(so_far + scanner.closing())
            if isinstance(value, (dict, list)):  # what tool arguments are: the SDK parses prefixes
                from_json(so_far.encode(), partial_mode=True)


def test_scanner_stops_at_the_end_of_the_value() -> None:
    scanner = JsonScanner()
    assert scanner.feed('  {"a": 1} trailing') == len('  {"a": 1}')
    assert scanner.done and scanner.take() == '{"a": 1}'
    number = JsonScanner()
    assert number.feed("42,") == 2 and number.done


@pytest.mark.parametrize("bad", ['{"a" 1}', '{"a": 1,}', "[1 2]", '{"a": tru3}', "{'a': 1}", '{"a": 01}', "}", '{"a": 1]', '{1: 2}', "nul!"])
def test_scanner_rejects_invalid_json_at_the_bad_character(bad: str) -> None:
    scanner = JsonScanner()
    with pytest.raises(JsonSyntaxError) as info:
        scanner.feed(bad)
    assert 0 <= info.value.consumed < len(bad)
    json_ok = bad[: info.value.consumed]
    with pytest.raises(ValueError):
        json.loads(bad)
    assert len(json_ok) < len(bad)


def test_scanner_repairs_control_characters_and_lone_surrogates() -> None:
    scanner = JsonScanner()
    scanner.feed('{"a": "line\nnext\ttab", "b": "\\ud83d\\ude80", "c": "\\ud83d!", "d": "\\ude80"}')
    out = scanner.take()
    assert json.loads(out) == {"a": "line\nnext\ttab", "b": "🚀", "c": "\ufffd!", "d": "\ufffd"}
    from_json(out.encode())  # strict parsers (the SDK's) accept it too


def test_scanner_holds_back_commas_keys_and_escapes() -> None:
    scanner = JsonScanner()
    scanner.feed('{"a": 1, "b"')
    assert scanner.take() == '{"a": 1' and scanner.closing() == "}"
    scanner.feed(': "x\\')
    assert scanner.take() == ', "b": "x' and scanner.closing() == '"}'
    scanner.feed("u00e9")
    assert scanner.take() == "\\u00e9"


def test_scanner_closing_completes_partial_scalars() -> None:
    for partial, closed in [('{"a": tr', {"a": True}), ('{"a": -', {"a": 0}), ('{"a": 1.', {"a": 1.0}),
                            ('{"a": 1e+', {"a": 1.0}), ('[nu', [None]), ('{"a": [{"b": "c', {"a": [{"b": "c"}]})]:
        scanner = JsonScanner()
        scanner.feed(partial)
        assert json.loads(scanner.take() + scanner.closing()) == closed


@pytest.mark.parametrize(("template", "fmt"), [
    ('{{- "<tool_call>\\n" }}{{ tool_call.arguments | tojson }}', "hermes"),
    ("<tool_call>\n<function={{ name }}>\n<parameter=", "qwen3_coder"),
    ("[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS][TOOL_CALLS]", "mistral_list"),
    ("[TOOL_CALLS]{{ call.name }}[ARGS]{{ call.arguments | tojson }}", "mistral"),
    ('{{- "<|python_tag|>" + tool_call.name }}', "llama3"),
    ('{"name": "{{ name }}", "parameters": {{ args }}}', "llama3"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),
    (None, "hermes"),
])
def test_detect_tool_format(template: str | None, fmt: str) -> None:
    assert detect_tool_format(template) == fmt


def test_registry() -> None:
    assert set(TOOL_FORMATS) == {"hermes", "llama3", "mistral", "mistral_list", "qwen3_coder", "json_fence", "glm",
                                 "harmony", "gemma4"}
    assert make_tool_parser("mistral").name == "mistral"
    with pytest.raises(ValueError, match="unknown tool-call format"):
        make_tool_parser("nope")


def calls_of(fmt: str, text: str, schemas: dict | None = None) -> tuple[list, str]:
    """(name, input) of each complete call, and all text, fed in random pieces."""
    seg = Segmenter(tool_parser=make_tool_parser(fmt, schemas))
    rng = random.Random(0)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        out += seg.feed(text[i:i + n])
        i += n
    out += seg.finish()
    calls, texts, args = [], [], ""
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


def test_hermes_parallel_calls() -> None:
    text = ('<tool_call>\n{"name": "A", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "B", "arguments": {"y": [2]}}\n</tool_call>')
    assert calls_of("hermes", text) == ([("A", {"x": 1}, True), ("B", {"y": [2]}, True)], "")


def test_hermes_call_without_end_tag_before_the_next() -> None:
    text = '<tool_call>{"name": "A", "arguments": {}}\n<tool_call>{"name": "B", "parameters": {"q": 1}}'
    assert calls_of("hermes", text) == ([("A", {}, True), ("B", {"q": 1}, True)], "")


def test_hermes_stray_closing_brace_before_the_end_tag() -> None:
    text = '<tool_call>\n{"name": "A", "arguments": {"x": 1}}}\n</tool_call>'
    assert calls_of("hermes", text) == ([("A", {"x": 1}, True)], "")


def test_llama3_builtin_python_call_is_text() -> None:
    text = '<|python_tag|>brave_search.call(query="weather")'
    assert calls_of("llama3", text) == ([], text)


def test_llama3_json_answer_that_is_not_a_call_stays_text() -> None:
    assert calls_of("llama3", '{"city": "Paris"}') == ([], '{"city": "Paris"}')
    assert calls_of("llama3", 'Here: {"name": "x", "parameters": {}}')[0] == []  # not at the start


def test_mistral_forms() -> None:
    assert calls_of("mistral", '[TOOL_CALLS] [{"name": "A", "arguments": {"x": 1}}]') == ([("A", {"x": 1}, True)], "")
    assert calls_of("mistral", '[TOOL_CALLS]{"name": "A", "arguments": {"x": 1}}') == ([("A", {"x": 1}, True)], "")
    assert calls_of("mistral", '[TOOL_CALLS]A[ARGS]{"x": 1}[TOOL_CALLS]B[ARGS]{}') == (
        [("A", {"x": 1}, True), ("B", {}, True)], "")
    assert calls_of("mistral", "[TOOL_CALLS]not a call at all") == ([], "[TOOL_CALLS]not a call at all")


def test_mistral_cut_short_is_repaired() -> None:
    assert calls_of("mistral", '[TOOL_CALLS]A[ARGS]{"x": "abc') == ([("A", {"x": "abc"}, False)], "")


def test_qwen3_coder_types_values_from_the_schema() -> None:
    schemas = {"F": {"properties": {"s": {"type": "string"}, "n": {"type": "integer"}, "o": {"type": "object"},
                                    "b": {"type": "boolean"}, "l": {"type": ["string", "null"]}}}}
    text = ("<tool_call>\n<function=F>\n<parameter=s>\n 42 \n</parameter>\n<parameter=n>\n42\n</parameter>\n"
            '<parameter=o>\n{"k": [1]}\n</parameter>\n<parameter=b>\ntrue\n</parameter>\n'
            "<parameter=l>\nmulti\nline\n</parameter>\n<parameter=unknown>\nx\n</parameter>\n"
            "<parameter=n2>\nnot json\n</parameter>\n</function>\n</tool_call>")
    calls, rest = calls_of("qwen3_coder", text, schemas)
    assert calls == [("F", {"s": " 42 ", "n": 42, "o": {"k": [1]}, "b": True, "l": "multi\nline", "unknown": "x",
                             "n2": "not json"}, True)]
    assert rest == ""


def test_qwen3_coder_cut_short_and_not_a_call() -> None:
    calls, _ = calls_of("qwen3_coder", "<tool_call>\n<function=F>\n<parameter=s>\nhalf a val")
    assert calls == [("F", {"s": "half a val"}, False)]
    assert calls_of("qwen3_coder", "<tool_call>hello</tool_call>") == ([], "<tool_call>hello</tool_call>")
