"""Incremental detokenizer (partial UTF-8) and stop-sequence matching over streamed text."""

from __future__ import annotations

import pytest

from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.stop_checker import StopChecker
from tests.helpers.tiny_engine import EOS, ByteTokenizer


def stream(text: str, extra=()) -> list[str]:
    detok = IncrementalDetokenizer(ByteTokenizer(), frozenset({EOS}))
    pieces = [detok.add(t) for t in [*text.encode("utf-8"), *extra]]
    return pieces + [detok.flush()]


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🎉🚀 ok"])
def test_detokenizer_never_emits_partial_characters(text):
    pieces = stream(text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 127 for c in text):
        assert "" in pieces[:-1]  # some byte had to wait for the rest of its character


def test_detokenizer_skips_end_of_turn_and_flushes_invalid_bytes():
    assert "".join(stream("hi", extra=[EOS])) == "hi"
    detok = IncrementalDetokenizer(ByteTokenizer())
    assert detok.add(0xE6) == ""  # a lone lead byte: held back
    assert detok.flush() == "\ufffd"  # at the end it is shown as what it is


def feed_all(stops, pieces):
    checker = StopChecker(tuple(stops))
    shown = []
    for p in pieces:
        shown.append(checker.feed(p))
        if checker.matched:
            break
    else:
        shown.append(checker.flush())
    return "".join(shown), checker.matched


def test_stop_sequence_split_across_pieces_never_leaks():
    text, matched = feed_all(["STOP"], ["hello S", "T", "OP and more"])
    assert (text, matched) == ("hello ", "STOP")


def test_false_start_is_released():
    text, matched = feed_all(["STOP"], ["a ST", "ART b"])
    assert (text, matched) == ("a START b", None)


def test_earliest_of_several_stops_wins():
    text, matched = feed_all(["world", "lo w"], ["hello world"])
    assert (text, matched) == ("hel", "lo w")


def test_held_text_is_not_shown_until_resolved():
    checker = StopChecker(("\n\nHuman:",))
    assert checker.feed("answer\n") == "answer"
    assert checker.feed("\nHu") == ""
    assert checker.feed("h?") == "\n\nHuh?"
