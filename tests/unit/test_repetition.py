"""The DRY loop guard: which tokens it penalises and by how much, that sequence breakers and
the prompt are outside its reach, that it breaks a real greedy loop, and how the server's
flags and the API switch it on (off by default)."""

from __future__ import annotations

import anthropic
import pytest
import torch

from pensieve.cli.main import build_parser
from pensieve.cli.settings import settings_from_args
from pensieve.engine.repetition import DryProcessor, breaker_ids
from pensieve.engine.types import DryParams, SamplingParams
from tests.helpers.api_fakes import ScriptedEngine, fake_server, text_script
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine

VOCAB = 16
BREAK = 9  # the one breaker token in these tests


def processor(tokens: list[int], **params: float) -> DryProcessor:
    breakers = torch.zeros(VOCAB, dtype=torch.bool)
    breakers[BREAK] = True
    proc = DryProcessor(DryParams(**params), breakers, capacity=4)  # small: exercises growth
    for t in tokens:
        proc.accept(t)
    return proc


def penalties(proc: DryProcessor) -> dict[int, float]:
    logits = torch.zeros(VOCAB)
    proc.apply(logits)
    return {i: round(-float(v), 4) for i, v in enumerate(logits) if v != 0}


def test_a_token_extending_a_repeat_loses_multiplier_times_base_to_the_excess() -> None:
    # 1 2 3 4 … 1 2 3: "4" would repeat a 3-token run (allowed 2 → exponent 1)
    assert penalties(processor([1, 2, 3, 4, 5, 1, 2, 3])) == {4: round(0.8 * 1.75, 4)}
    # a 2-token repeat is at the allowance: penalty multiplier · base^0
    assert penalties(processor([1, 2, 3, 5, 1, 2])) == {3: 0.8}
    # shorter repeats are free
    assert penalties(processor([1, 2, 3, 5, 1])) == {}


def test_the_longest_match_decides_and_penalties_grow_with_it() -> None:
    proc = processor([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7], multiplier=1.0, base=2.0)
    assert penalties(proc) == {8: 2.0 ** (7 - 2)}
    # two candidates: 3 after "1 2", 4 after "2 1 2" — each by its own match
    assert penalties(processor([2, 1, 2, 4, 1, 2, 3, 2, 1, 2], multiplier=1.0, base=2.0)) == {4: 2.0, 3: 1.0}


def test_a_breaker_ends_every_match() -> None:
    assert penalties(processor([1, 2, 3, 4, BREAK, 1, 2, 3])) == {4: round(0.8 * 1.75, 4)}
    assert penalties(processor([1, 2, 3, 4, 1, 2, BREAK, 3])) == {}  # no run spans the breaker
    assert penalties(processor([1, 2, 3, 4, 1, 2, 3, BREAK])) == {}


def test_forbidden_tokens_stay_forbidden() -> None:
    proc = processor([1, 2, 3, 4, 1, 2, 3])
    logits = torch.zeros(VOCAB)
    logits[4] = float("-inf")
    proc.apply(logits)
    assert logits[4] == float("-inf") and torch.isfinite(logits[:4]).all()


def test_breakers_are_tokens_whose_text_holds_a_breaker_string() -> None:
    flags = breaker_ids(ByteTokenizer().id_to_piece, 257)
    assert {i for i in range(257) if flags[i]} == {ord(":"), ord('"'), ord("*")}


def test_it_breaks_a_greedy_loop_of_a_real_engine_and_never_reads_the_prompt() -> None:
    def run(dry: DryParams | None, prompt: bytes) -> list[int]:
        engine = tiny_engine()
        engine.add_request("r", list(prompt), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, dry=dry))
        out: list[int] = []
        while engine.has_work():
            for delta in engine.step():
                out += delta.token_ids
        return out

    def longest_repeat(ids: list[int]) -> int:
        best = 0
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                n = 0
                while j + n < len(ids) and ids[i + n] == ids[j + n]:
                    n += 1
                best = max(best, n)
        return best

    plain = run(None, b"hello")
    assert longest_repeat(plain) >= 10, "the tiny model is expected to loop greedy"
    guarded = run(DryParams(multiplier=2.0), b"hello")
    assert guarded[:2] == plain[:2]  # nothing repeats yet: same tokens
    assert longest_repeat(guarded) < longest_repeat(plain)
    # the prompt is not part of the match: after a prompt that holds the loop, the model
    # continues it unpenalised until the output itself repeats (3 tokens at the earliest)
    looped_prompt = b"hello" + bytes(t for t in plain if t < 256)
    assert run(DryParams(multiplier=2.0), looped_prompt)[:3] == run(None, looped_prompt)[:3]


def client(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=30)


def _settings(*flags: str):
    ns = build_parser().parse_args(["serve", "--device", "cpu", *flags])
    return settings_from_args(ns, {})


def test_flags_switch_it_on_and_bad_values_are_refused() -> None:
    assert _settings("--model", "/m.gguf").dry is None  # off for a model that declares none
    # the default SmolLM2 declares the guard (pensieve/store/catalogue.py); a flag still rules
    assert _settings().dry == DryParams(multiplier=0.8)
    assert _settings("--dry-multiplier", "0").dry is None
    assert _settings("--dry-multiplier", "0.8").dry == DryParams(multiplier=0.8)
    assert _settings("--dry-multiplier", "1", "--dry-allowed-length", "4").dry == DryParams(1.0, 1.75, 4)
    for flags in (("--dry-multiplier", "-1"), ("--dry-allowed-length", "3"),
                  ("--dry-multiplier", "1", "--dry-allowed-length", "0")):
        with pytest.raises(ValueError):
            _settings(*flags)


def test_the_server_setting_reaches_every_request() -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine, dry=DryParams(multiplier=0.5)) as url:
        client(url).messages.create(model="tiny-model", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
    assert engine.calls[0].params.dry == DryParams(multiplier=0.5)
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine) as url:
        client(url).messages.create(model="tiny-model", max_tokens=7, messages=[{"role": "user", "content": "hi"}])
    assert engine.calls[0].params.dry is None
