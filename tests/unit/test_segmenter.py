"""Segmenter: generated text → text | thinking | tool-call segments, whatever the deltas.

The oracle for splits is the segmenter itself fed the whole text at once: every way of
cutting the text into deltas must give the same blocks (fuzzed over every split point).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
from jiter import from_json

from pensieve.chat.segmenter import Segmenter, ThinkingMarkers
from pensieve.chat.segments import (
    Segment,
    TextSegment,
    ThinkingSegment,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
)
from pensieve.chat.tool_parsers import make_tool_parser

SCHEMAS = {"Bash": {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}}}


def segmenter(fmt: str | None = "hermes", *, thinking: bool = True, **kw: object) -> Segmenter:
    parser = make_tool_parser(fmt, SCHEMAS) if fmt else None
    return Segmenter(tool_parser=parser, thinking=ThinkingMarkers() if thinking else None, **kw)  # type: ignore[arg-type]


def run(pieces: Sequence[str], **kw: object) -> tuple[list[Segment], Segmenter]:
    seg = segmenter(**kw)  # type: ignore[arg-type]
    out: list[Segment] = []
    for piece in pieces:
        out += seg.feed(piece)
    out += seg.finish()
    return out, seg


def blocks(segments: Sequence[Segment]) -> list[tuple]:
    """Segments merged into blocks: ("text", …), ("thinking", …), ("tool", name, args, complete)."""
    out: list[list] = []
    for s in segments:
        if isinstance(s, (TextSegment, ThinkingSegment)):
            kind = "text" if isinstance(s, TextSegment) else "thinking"
            if out and out[-1][0] == kind:
                out[-1][1] += s.text
            else:
                out.append([kind, s.text])
        elif isinstance(s, ToolCallStart):
            out.append(["tool", s.name, "", None])
        elif isinstance(s, ToolCallDelta):
            assert out and out[-1][0] == "tool" and out[-1][3] is None, "arguments outside a call"
            out[-1][2] += s.partial_json
            from_json(out[-1][2].encode(), partial_mode=True)  # every prefix parses, as the SDK does
        elif isinstance(s, ToolCallEnd):
            assert out and out[-1][0] == "tool"
            out[-1][3] = s.complete
    return [tuple(b) for b in out]


def splits(text: str, rng: random.Random) -> list[list[str]]:
    """Every 2-way split, char by char, and random many-way splits."""
    ways = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    ways.append(list(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 8))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return ways


CASES = [
    ("hermes", 'Sure.\n\n<tool_call>\n{"name": "Bash", "arguments": {"command": "ls -la", "n": [1, -2.5e3, true, null, {"x": "\\u00e9\\n"}]}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "Bash", "arguments": {"command": "a"}}\n</tool_call>\n<tool_call>\n{"name": "Read", "arguments": {}}\n</tool_call>\n'),
    ("hermes", "<think>\nLet me think.\n</think>\n\nThe answer is 4."),
    ("hermes", '<think>plan</think>Running.<tool_call>{"arguments": {"b": 2}, "name": "Bash"}</tool_call>'),
    ("hermes", "a < b and <tool is not a marker; <thinking> neither"),
    ("hermes", 'Bad: <tool_call>{"name": Bash}</tool_call> then text'),
    ("hermes", 'Bad: <tool_call>{"name": "Bash", "arguments": {"a": "b", "c": [1, oops]}}</tool_call> then'),
    ("llama3", '{"name": "Bash", "parameters": {"command": "ls"}}; {"name": "Read", "parameters": {"path": "/x"}}'),
    ("llama3", '<|python_tag|>{"name": "Bash", "parameters": {"command": "echo \\"hi\\""}}'),
    ("llama3", '{"answer": 42}'),
    ("mistral", '[TOOL_CALLS][{"name": "Bash", "arguments": {"command": "ls"}}, {"name": "Read", "arguments": {"p": 1}}]'),
    ("mistral", 'Ok.[TOOL_CALLS]Bash[ARGS]{"command": "ls"}[TOOL_CALLS]Read[CALL_ID]a1b2c3d4e[ARGS]{"p": [1]}'),
    ("qwen3_coder", 'On it.\n<tool_call>\n<function=Bash>\n<parameter=command>\nls -la\n"quoted" </para\n</parameter>\n<parameter=timeout>\n5000\n</parameter>\n</function>\n</tool_call>'),
]


@pytest.mark.parametrize(("fmt", "text"), CASES)
def test_every_split_gives_the_same_blocks(fmt: str, text: str) -> None:
    expected, _ = run([text], fmt=fmt)
    want = blocks(expected)
    rng = random.Random(text)
    for pieces in splits(text, rng):
        got, _ = run(pieces, fmt=fmt)
        assert blocks(got) == want, pieces


@pytest.mark.parametrize(("fmt", "text"), CASES)
def test_no_marker_text_leaks_into_text_or_thinking(fmt: str, text: str) -> None:
    out, _ = run(list(text), fmt=fmt)
    for block in blocks(out):
        if block[0] in ("text", "thinking") and "Bad:" not in text:
            for marker in ("<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "<|python_tag|>",
                           "[ARGS]", "<function=", "<parameter="):
                assert marker not in block[1]


def test_hermes_calls_text_and_thinking() -> None:
    out, seg = run(["<think>\nhmm\n</think>\n\nSure.\n\n<tool_call>\n",
                    '{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>'])
    assert blocks(out) == [("thinking", "hmm"), ("text", "Sure."), ("tool", "Bash", '{"command": "ls"}', True)]
    assert seg.calls == 1 and not seg.done


def test_arguments_stream_before_the_call_closes() -> None:
    seg = segmenter()
    first = seg.feed('<tool_call>\n{"name": "Write", "arguments": {"content": "line one')
    assert first[0] == ToolCallStart("Write")
    assert "".join(s.partial_json for s in first if isinstance(s, ToolCallDelta)) == '{"content": "line one'
    assert seg.feed(" and two")[0] == ToolCallDelta(" and two")


def test_arguments_before_name_are_held_until_the_object_ends() -> None:
    out, _ = run(['<tool_call>{"arguments": {"a": 1}, "name": "Bash"}</tool_call>'])
    assert blocks(out) == [("tool", "Bash", '{"a": 1}', True)]


def test_string_encoded_arguments_are_decoded() -> None:
    out, _ = run(['<tool_call>{"name": "Bash", "arguments": "{\\"a\\": [1]}"}</tool_call>'])
    assert blocks(out) == [("tool", "Bash", '{"a": [1]}', True)]


def test_raw_newlines_in_strings_are_escaped() -> None:
    out, _ = run(['<tool_call>{"name": "Write", "arguments": {"content": "a\nb"}}</tool_call>'])
    args = blocks(out)[0][2]
    assert json.loads(args) == {"content": "a\nb"}


def test_malformed_call_comes_back_as_text_whole() -> None:
    text = 'Look: <tool_call>\n{"name": "Bash", "arguments": [1, 2]}\n</tool_call> done'
    out, seg = run([text])
    assert blocks(out) == [("text", text)] and seg.calls == 0


def test_call_broken_mid_arguments_is_closed_and_comes_back_as_text() -> None:
    text = '<tool_call>{"name": "Bash", "arguments": {"command": "ls", "x": [1, oops]}}</tool_call> after'
    out, seg = run([text])
    assert blocks(out) == [("tool", "Bash", '{"command": "ls", "x": [1]}', False),
                           ("text", text)]
    assert seg.calls == 0


def test_invalid_escapes_in_strings_are_read_literally() -> None:
    out, _ = run(['<tool_call>{"name": "Bash", "arguments": {"command": "grep \\d+ \\u12G4"}}</tool_call>'])
    assert json.loads(blocks(out)[0][2]) == {"command": "grep \\d+ \\u12G4"}


def test_call_cut_short_by_max_tokens_is_closed_by_repair() -> None:
    out, seg = run(['<tool_call>{"name": "Bash", "arguments": {"command": "ls", "x": [1, {"y": "ab'])
    assert blocks(out) == [("tool", "Bash", '{"command": "ls", "x": [1, {"y": "ab"}]}', False)]
    assert seg.calls == 0
    out, _ = run(['<tool_call>{"name": "Bash", "arguments": {"command": "ls", "x"'])
    assert blocks(out) == [("tool", "Bash", '{"command": "ls"}', False)]


def test_call_cut_short_before_it_started_is_text() -> None:
    out, _ = run(['Hi <tool_call>{"name": "Ba'])
    assert blocks(out) == [("text", 'Hi <tool_call>{"name": "Ba')]


def test_partial_marker_at_the_end_is_text() -> None:
    out, _ = run(["See <tool_"])
    assert blocks(out) == [("text", "See <tool_")]
    out, _ = run(["hmm <", "/thi"], fmt=None)
    assert blocks(out) == [("text", "hmm </thi")]


def test_disable_parallel_stops_after_the_first_call() -> None:
    one = '<tool_call>{"name": "Bash", "arguments": {}}</tool_call>'
    seg = segmenter(max_calls=1)
    out = seg.feed(one + "\n" + one)
    assert blocks(out) == [("tool", "Bash", "{}", True)] and seg.done
    assert seg.feed("more") == [] and seg.finish() == []


def test_invented_tool_response_ends_the_turn() -> None:
    out, seg = run(['<tool_call>{"name": "Bash", "arguments": {}}</tool_call>\n<tool_response>\nfake'])
    assert blocks(out) == [("tool", "Bash", "{}", True)] and seg.done
    # Before any call it is just text.
    out, seg = run(["<tool_response>x"])
    assert blocks(out) == [("text", "<tool_response>x")] and not seg.done


def test_without_a_parser_tool_markup_is_text() -> None:
    text = '<tool_call>{"name": "Bash", "arguments": {}}</tool_call>'
    out, seg = run([text], fmt=None)
    assert blocks(out) == [("text", text)] and seg.calls == 0


def test_generation_starting_inside_thinking() -> None:
    out, _ = run(["\nreasoning", " more\n</think>\n\nAnswer"], start_in_thinking=True)
    assert blocks(out) == [("thinking", "reasoning more"), ("text", "Answer")]
    out, _ = run(["cut short"], start_in_thinking=True)
    assert blocks(out) == [("thinking", "cut short")]


def test_without_thinking_markers_think_tags_are_text() -> None:
    out, _ = run(["<think>x</think>y"], thinking=False)
    assert blocks(out) == [("text", "<think>x</think>y")]


def test_plain_text_streams_unchanged() -> None:
    seg = segmenter(None, thinking=False)
    assert seg.feed("Hello ") == [TextSegment("Hello ")]  # nothing to hold back for
    assert seg.feed("world\n") == [TextSegment("world\n")]


def test_whitespace_is_held_only_while_a_marker_may_follow() -> None:
    seg = segmenter()
    assert seg.feed("Hello ") == [TextSegment("Hello")]
    assert seg.feed("world") == [TextSegment(" world")]
    assert seg.finish() == []
    out, _ = run(["trailing  "])
    assert blocks(out) == [("text", "trailing  ")]
