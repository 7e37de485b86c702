"""The upstream backend's pure pieces: rendezvous hashing, replica order and failover marks,
session keys, request bodies and stream reading (the HTTP path: test_upstream_client.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pensieve.api.session_key import routing_hint_for, session_id
from pensieve.backends.upstream_replicas import ReplicaSet, rank
from pensieve.backends.upstream_request import ChunkReader, UpstreamProtocolError, request_body, sse_data
from pensieve.engine.types import GrammarSpec, SamplingParams
from pensieve.protocol import MessageCreateParams

URLS = ["http://a:8000", "http://b:8000", "http://c:8000"]


def test_rendezvous_is_stable_and_spreads_sessions() -> None:
    keys = [f"session-{i}" for i in range(300)]
    first = {k: rank(k, URLS)[0] for k in keys}
    assert first == {k: rank(k, list(reversed(URLS)))[0] for k in keys}  # order of URLs irrelevant
    spread = Counter(first.values())
    assert set(spread) == set(URLS) and min(spread.values()) > 60  # ~100 each


def test_removing_a_replica_moves_only_its_sessions() -> None:
    keys = [f"s{i}" for i in range(300)]
    before = {k: rank(k, URLS)[0] for k in keys}
    after = {k: rank(k, URLS[:2])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == URLS[2] for k in moved)


def test_order_puts_unhealthy_replicas_last_and_failover_follows_rank() -> None:
    replicas = ReplicaSet(URLS, interval_s=0)
    key = "abc"
    best = replicas.order(key)[0]
    replicas.mark(best, False, "refused")
    order = replicas.order(key)
    assert order[0].url == rank(key, URLS)[1] and order[-1] is best
    replicas.mark(best, True)
    assert replicas.order(key)[0] is best  # back on its home replica once healthy


def test_health_checks_mark_replicas() -> None:
    down = {"http://b:8000/health"}
    replicas = ReplicaSet(URLS, interval_s=0, probe=lambda url: url not in down)
    replicas.check_all()
    assert [r.url for r in replicas.replicas.values() if not r.healthy] == ["http://b:8000"]
    replicas.probe = lambda url: (_ for _ in ()).throw(OSError("refused"))
    replicas.check_all()
    assert not replicas.any_healthy()
    assert "refused" in (replicas.replicas["http://a:8000"].last_error or "")


def test_replica_set_refuses_empty_and_repeated_urls() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ReplicaSet([])
    with pytest.raises(ValueError, match="repeat"):
        ReplicaSet(["http://a:1/", "http://a:1"])


def _body(**extra: object) -> MessageCreateParams:
    return MessageCreateParams.model_validate(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_session_key_from_header_metadata_json_or_legacy() -> None:
    assert session_id({"x-claude-code-session-id": "hdr-1"}, {"user_id": "x"}) == "hdr-1"
    user = json.dumps({"device_id": "d", "account_uuid": "", "session_id": "beef-8c08"})
    assert session_id({}, {"user_id": user}) == "beef-8c08"
    legacy = "user_abc_account_123_session_0f1e2d3c-aaaa-bbbb-cccc-111122223333"
    assert session_id({}, {"user_id": legacy}) == "0f1e2d3c-aaaa-bbbb-cccc-111122223333"
    assert session_id({}, {"user_id": "plain-user"}) is None
    assert session_id({}, None) is None


def test_captured_claude_code_request_routes_by_its_session() -> None:
    from pathlib import Path

    raw = json.loads((Path(__file__).parents[1] / "fixtures" / "claude_code_request.json").read_text())
    hint = routing_hint_for({}, MessageCreateParams.model_validate(raw))
    assert hint.session_key == json.loads(raw["metadata"]["user_id"])["session_id"]
    assert not hint.side_call and hint.key == hint.session_key


def test_side_calls_get_their_own_key() -> None:
    tool = {"name": "Read", "input_schema": {"type": "object"}}
    main = routing_hint_for({"x-claude-code-session-id": "s1"}, _body(tools=[tool]))
    side = routing_hint_for({"x-claude-code-session-id": "s1"}, _body())
    assert main.key == "s1" and side.side_call and side.key == "s1/side"
    assert routing_hint_for({}, _body()).key is None


def test_vllm_body_carries_ids_sampling_and_constraint() -> None:
    grammar = GrammarSpec("json_schema", json.dumps({"type": "object"}))
    params = SamplingParams(max_tokens=7, temperature=0.0, top_k=5, seed=3, grammar=grammar,
                            stop_sequences=("END",))
    body = request_body("vllm", "served", [1, 2, 3], params, frozenset({2, 0}))
    assert body["prompt"] == [1, 2, 3] and body["model"] == "served"
    assert body["return_token_ids"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["seed"]) == (7, 0.0, 5, 3)
    assert body["stop_token_ids"] == [0, 2] and "stop" not in body  # stop strings stay local
    assert body["structured_outputs"] == {"json": {"type": "object"}}
    tag = request_body("vllm", "m", [1], SamplingParams(grammar=GrammarSpec("structural_tag", '{"x":1}')),
                       frozenset())
    assert tag["structured_outputs"] == {"structural_tag": '{"x":1}'} and "top_k" not in tag
    ebnf = request_body("vllm", "m", [1], SamplingParams(grammar=GrammarSpec("ebnf", "root ::= \"a\"")),
                        frozenset())
    assert ebnf["structured_outputs"] == {"grammar": "root ::= \"a\""}


def test_sglang_body() -> None:
    params = SamplingParams(max_tokens=4, grammar=GrammarSpec("ebnf", "root ::= \"a\""))
    body = request_body("sglang", "m", [5, 6], params, frozenset({0}))
    assert body["input_ids"] == [5, 6] and body["stream"] is True
    sp = body["sampling_params"]
    assert sp["max_new_tokens"] == 4 and sp["ebnf"] == "root ::= \"a\"" and sp["stop_token_ids"] == [0]


def test_vllm_chunks_and_usage() -> None:
    reader = ChunkReader("vllm")
    chunk = reader.read(json.dumps({"choices": [{"text": "ab", "token_ids": [4, 5], "finish_reason": None}]}))
    assert chunk.token_ids == [4, 5] and chunk.finish_reason is None
    usage = reader.read(json.dumps({"choices": [], "usage": {
        "prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}}))
    assert (usage.prompt_tokens, usage.cached_tokens) == (40, 32)
    assert reader.read("[DONE]") is None
    with pytest.raises(UpstreamProtocolError, match="return_token_ids"):
        reader.read(json.dumps({"choices": [{"text": "x", "finish_reason": None}]}))
    with pytest.raises(UpstreamProtocolError):
        reader.read("{broken")
    error = reader.read(json.dumps({"error": {"message": "boom"}}))
    assert error.error == "boom"
    assert sse_data("data: {}") == "{}" and sse_data(": ping") is None


def test_sglang_chunks_are_cumulative() -> None:
    reader = ChunkReader("sglang")
    assert reader.read(json.dumps({"output_ids": [1, 2], "meta_info": {}})).token_ids == [1, 2]
    last = reader.read(json.dumps({"output_ids": [1, 2, 3], "meta_info": {
        "finish_reason": {"type": "stop"}, "prompt_tokens": 9, "cached_tokens": 8}}))
    assert last.token_ids == [3] and last.finish_reason == "stop" and last.cached_tokens == 8


def test_no_grammar_goes_upstream_while_the_model_may_think() -> None:
    from pensieve.engine.types import ThinkingBudget

    grammar = GrammarSpec("ebnf", "root ::= \"a\"")
    thinking = SamplingParams(grammar=grammar, thinking_budget=ThinkingBudget((7,), None, starts_open=True))
    assert "structured_outputs" not in request_body("vllm", "m", [1], thinking, frozenset())
    assert "ebnf" not in request_body("sglang", "m", [1], thinking, frozenset())["sampling_params"]
