"""Grammars off the hot path: a request whose grammar compiles waits in its own state while the
others keep producing a token every step; a compile past its timeout degrades (fallback, else
unconstrained) with a warning; tool grammars carry that fallback; schema vetting runs off the
event loop."""

from __future__ import annotations

import json
import threading

import pytest

xgr = pytest.importorskip("xgrammar")

from pensieve.chat.tool_grammar import tool_call_grammar  # noqa: E402
from pensieve.engine.grammar import GrammarCompiler  # noqa: E402
from pensieve.engine.request import RequestStatus  # noqa: E402
from pensieve.engine.types import FinishReason, GrammarSpec, SamplingParams  # noqa: E402
from pensieve.loaders.tokenizer import TextTokenizer  # noqa: E402
from pensieve.protocol import ToolParam  # noqa: E402
from tests.unit.loader_fixtures import tiny_bpe_tokenizer  # noqa: E402
from tests.unit.test_grammar import SCHEMA, bpe_engine  # noqa: E402
from tests.unit.test_loader_tokenizer import bpe_metadata  # noqa: E402

STRICT = GrammarSpec("json_schema", json.dumps(SCHEMA | {"properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"]}), label="slow one")
LOOSE = GrammarSpec("json_schema", json.dumps({"type": "array", "items": {"type": "integer"}}),
                    label="loose one")


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.from_gguf_metadata(bpe_metadata(tiny_bpe_tokenizer()))


@pytest.fixture
def gate(monkeypatch):
    """Compiles of specs labelled ``slow …`` wait for ``gate.set()`` (at most 5 s, so that an
    engine that waits for the compile inside a step stalls visibly instead of hanging)."""
    gate = threading.Event()
    original = GrammarCompiler._compile

    def slow_compile(self, spec):
        if spec.label.startswith("slow"):
            gate.wait(5)
        return original(self, spec)

    monkeypatch.setattr(GrammarCompiler, "_compile", slow_compile)
    yield gate
    gate.set()


def plain() -> SamplingParams:
    return SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


def step_tokens(engine, out: dict[str, list[int]], final: dict) -> dict[str, int]:
    """One step; how many tokens each request got in it."""
    got: dict[str, int] = {}
    for d in engine.step():
        out.setdefault(d.request_id, []).extend(d.token_ids)
        got[d.request_id] = got.get(d.request_id, 0) + len(d.token_ids)
        if d.finish_reason is not None:
            final[d.request_id] = d
    return got


def finish(engine, out, final) -> None:
    for _ in range(2000):
        if not engine.has_work():
            return
        step_tokens(engine, out, final)
    raise AssertionError("the engine did not finish")


def test_others_step_while_a_grammar_compiles_then_it_runs_constrained(bpe, gate):
    engine = bpe_engine(bpe, grammar_timeout_s=30)
    prompt = bpe.encode("hello world")
    out: dict[str, list[int]] = {}
    final: dict = {}
    engine.add_request("p", prompt, plain())
    step_tokens(engine, out, final)  # p prefilled: decoding from here on
    engine.add_request("g", prompt, SamplingParams(max_tokens=60, temperature=1.0, seed=3, grammar=STRICT))
    for _ in range(8):  # the compile is held: p gets a token every step all the same
        got = step_tokens(engine, out, final)
        assert got.get("p") == 1 and "g" not in got
        assert engine._requests["g"].status is RequestStatus.WAITING_FOR_GRAMMAR
        assert engine.num_waiting == 1
    gate.set()
    finish(engine, out, final)
    text = bpe.decode(out["g"])
    assert final["g"].finish_reason is FinishReason.EOS and json.loads(text).keys() == {"n"}
    assert final["p"].finish_reason is FinishReason.MAX_TOKENS
    alone = bpe_engine(bpe)
    alone_out: dict[str, list[int]] = {}
    alone.add_request("p", prompt, plain())
    finish(alone, alone_out, {})
    assert out["p"] == alone_out["p"]  # the waiting request changed nothing for p


def test_abort_while_waiting_for_the_grammar(bpe, gate):
    engine = bpe_engine(bpe)
    engine.add_request("g", bpe.encode("hi"), SamplingParams(max_tokens=5, grammar=STRICT))
    assert engine.has_work() and engine.num_waiting == 1
    assert engine.abort("g").finish_reason is FinishReason.ABORTED
    assert not engine.has_work() and engine.num_waiting == 0
    assert engine.step() == []


def test_a_compile_past_the_timeout_runs_the_fallback_and_logs(bpe, gate, caplog):
    engine = bpe_engine(bpe, grammar_timeout_s=0.2)
    spec = GrammarSpec(STRICT.kind, STRICT.payload, label="slow tools (Bash, Read)", fallback=LOOSE)
    out: dict[str, list[int]] = {}
    final: dict = {}
    engine.add_request("p", bpe.encode("hello"), plain())
    engine.add_request("g", bpe.encode("hello"), SamplingParams(max_tokens=40, temperature=1.0, seed=1, grammar=spec))
    while "g" not in out and engine.has_work():
        got = step_tokens(engine, out, final)
        assert "p" in final or got.get("p") == 1 or not out.get("p")  # p never stalls
    finish(engine, out, final)
    assert "slow tools (Bash, Read) not compiled within 0.2 s" in caplog.text
    assert "loose one" in caplog.text
    value = json.loads(bpe.decode(out["g"]))  # generated under the fallback: an int array
    assert isinstance(value, list) and all(isinstance(v, int) for v in value)
    assert final["g"].finish_reason is FinishReason.EOS


def test_without_a_fallback_a_timed_out_grammar_runs_unconstrained(bpe, gate, caplog):
    engine = bpe_engine(bpe, grammar_timeout_s=0.1)
    spec = GrammarSpec(STRICT.kind, STRICT.payload, label="slow, no fallback")
    out: dict[str, list[int]] = {}
    final: dict = {}
    engine.add_request("g", bpe.encode("hi"), SamplingParams(max_tokens=6, temperature=0.0, grammar=spec,
                                                             ignore_eos=True))
    finish(engine, out, final)
    assert final["g"].finish_reason is FinishReason.MAX_TOKENS and len(out["g"]) == 6
    assert "grammar slow, no fallback dropped, generating unconstrained: not compiled within 0.1 s" in caplog.text


def test_a_compiled_grammar_is_cached_and_admitted_at_once(bpe):
    engine = bpe_engine(bpe)
    engine.add_request("a", bpe.encode("hi"), SamplingParams(max_tokens=3, grammar=LOOSE))
    engine.grammars.compile(LOOSE)  # the cache's future, done
    engine.add_request("b", bpe.encode("hi"), SamplingParams(max_tokens=3, grammar=LOOSE))
    assert "b" not in engine._compiling  # straight to the scheduler


def test_tool_grammars_fall_back_to_calls_with_unchecked_arguments(bpe):
    bash = ToolParam(name="Bash", input_schema={
        "type": "object", "properties": {"command": {"type": "string"}},
        "required": ["command"], "additionalProperties": False})
    spec = tool_call_grammar([bash], choice="any")
    assert "Bash" in spec.label and spec.fallback is not None
    assert spec.fallback.label.endswith("arguments unchecked")
    compiler = GrammarCompiler(bpe, bpe.vocab_size)
    odd_call = '<tool_call>\n{"name": "Bash", "arguments": {"cmd": 1}}\n</tool_call>'
    for grammar, ok in ((spec, False), (spec.fallback, True)):
        matcher = xgr.GrammarMatcher(compiler.compile(grammar))
        assert (matcher.accept_string(odd_call) and matcher.is_completed()) is ok
    assert not xgr.GrammarMatcher(compiler.compile(spec.fallback)).accept_string('<tool_call>\n{"name": "Write"')


def test_schema_vetting_runs_off_the_event_loop(monkeypatch):
    import asyncio

    import httpx

    from pensieve.api import generation
    from tests.helpers.api_fakes import ScriptedEngine, fake_server, text_script

    where: list[str] = []
    original = generation.decoding_constraints

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return original(*args, **kwargs)

    monkeypatch.setattr(generation, "decoding_constraints", recording)
    engine = ScriptedEngine(text_script("ok"))
    body = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "Bash", "input_schema": {"type": "object", "properties": {
                "command": {"type": "string", "pattern": "^[a-z]+$"}}}}],
            "tool_choice": {"type": "any"}}
    with fake_server(engine) as url:
        response = httpx.post(f"{url}/v1/messages", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert where == ["worker thread"]
    assert engine.calls[0].params.grammar is not None
