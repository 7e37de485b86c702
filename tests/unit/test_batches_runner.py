"""The batch runner over a scripted engine (the boundary; the real engine runs it in
tests/integration/test_batches.py): results, per-entry errors, retries, shutdown, expiry."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pensieve.api.batches.runner import BatchRunner
from pensieve.api.batches.store import BatchStore
from pensieve.api.config import ApiConfig
from pensieve.api.state import Services
from pensieve.chat import PromptRenderer
from pensieve.engine.errors import EngineOverloadedError
from pensieve.engine.types import BACKGROUND_PRIORITY, FinishReason, GenerationDelta
from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, text_script

GOOD = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def _services(engine: Any) -> Services:
    return Services(config=ApiConfig(model_id="tiny-model", context_length=4096), engine=engine,
                    renderer=PromptRenderer(CharTokenizer(), None))


async def _until(condition, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def _results(store: BatchStore, record) -> dict[str, Any]:
    lines = store.results_path(record).read_text().splitlines()
    return {entry["custom_id"]: entry["result"] for entry in map(json.loads, lines)}


def test_each_entry_gets_its_own_result_at_background_priority(tmp_path):
    engine = ScriptedEngine(text_script("Hel", "lo"))
    store = BatchStore(tmp_path)
    record = store.create([("ok", GOOD), ("no-messages", {"model": "claude-x", "max_tokens": 8}),
                           ("other-model", {**GOOD, "model": "gpt-4"}), ("ok2", GOOD)])

    async def run() -> None:
        runner = BatchRunner(store, _services(engine), concurrency=2)
        runner.ensure_started()
        await _until(lambda: record.ended_at is not None)
        await runner.stop()

    asyncio.run(run())
    results = _results(store, record)
    assert results["ok"]["type"] == "succeeded" and results["ok"]["message"]["content"][0]["text"] == "Hello"
    assert results["ok2"]["message"]["stop_reason"] == "end_turn"
    assert results["no-messages"]["type"] == "errored"
    assert results["no-messages"]["error"]["type"] == "error"
    assert results["no-messages"]["error"]["error"]["type"] == "invalid_request_error"
    assert results["other-model"]["error"]["error"]["type"] == "not_found_error"
    assert len(engine.calls) == 2 and all(c.params.priority == BACKGROUND_PRIORITY for c in engine.calls)
    assert record.counts().succeeded == 2 and record.counts().errored == 2


def test_an_overloaded_engine_is_retried_not_recorded(tmp_path):
    attempts = []

    def script(prompt_ids, params, request_id):
        attempts.append(request_id)
        if len(attempts) == 1:
            return [EngineOverloadedError("queue full")]
        return text_script("ok")(prompt_ids, params, request_id)

    engine = ScriptedEngine(script)
    store = BatchStore(tmp_path)
    record = store.create([("only", GOOD)])

    async def run() -> None:
        runner = BatchRunner(store, _services(engine), concurrency=1)
        runner.ensure_started()
        await _until(lambda: record.ended_at is not None)
        await runner.stop()

    asyncio.run(run())
    assert len(attempts) == 2 and _results(store, record)["only"]["type"] == "succeeded"


class _DrainingEngine(ScriptedEngine):
    """Ends every generation with an error once ``drain`` is called, as EngineClient does."""

    dead_reason: str | None = None

    def drain(self) -> None:
        self.dead_reason = "the server is shutting down"


def test_requests_cut_by_a_shutdown_stay_pending_for_the_restart(tmp_path):
    engine = _DrainingEngine(lambda p, params, rid: [
        0.05, GenerationDelta(rid, finish_reason=FinishReason.ERROR, error="the inference engine stopped")])
    store = BatchStore(tmp_path)
    record = store.create([("a", GOOD), ("b", GOOD)])

    async def run() -> None:
        runner = BatchRunner(store, _services(engine), concurrency=2)
        engine.drain()
        runner.ensure_started()
        await asyncio.sleep(0.3)
        await runner.stop()

    asyncio.run(run())
    assert record.done == {} and record.ended_at is None
    assert [p.custom_id for p in BatchStore(tmp_path).pending(BatchStore(tmp_path).get(record.id))] == ["a", "b"]


def test_an_expired_batch_ends_its_unfinished_requests_as_expired(tmp_path):
    engine = ScriptedEngine(text_script("never", delay_s=30))
    store = BatchStore(tmp_path, expiry_s=0.2)
    record = store.create([("slow", GOOD), ("waiting", GOOD)])

    async def run() -> None:
        runner = BatchRunner(store, _services(engine), concurrency=1)
        runner.ensure_started()
        await asyncio.sleep(0.3)
        runner.wake()  # the idle check runs every minute; a wake runs it now
        await _until(lambda: record.ended_at is not None)
        await runner.stop()

    asyncio.run(run())
    assert _results(store, record) == {"slow": {"type": "expired"}, "waiting": {"type": "expired"}}
    assert record.counts().expired == 2
    assert engine.calls[0].aborted.is_set()  # the running generation was stopped


def test_a_compaction_entry_is_answered_with_the_compaction_block(tmp_path):
    engine = ScriptedEngine(text_script("The user ", "said hi."))
    store = BatchStore(tmp_path)
    record = store.create([("compact", {**GOOD, "compaction": {"type": "summarize"}})])

    async def run() -> None:
        runner = BatchRunner(store, _services(engine), concurrency=1)
        runner.ensure_started()
        await _until(lambda: record.ended_at is not None)
        await runner.stop()

    asyncio.run(run())
    message = _results(store, record)["compact"]["message"]
    assert message["stop_reason"] == "compaction"
    assert message["content"] == [{"type": "compaction", "content": "The user said hi."}]
    assert engine.calls[0].params.priority == BACKGROUND_PRIORITY


def test_a_cancel_cut_short_by_a_crash_ends_after_the_restart(tmp_path):
    store = BatchStore(tmp_path)
    record = store.create([("a", GOOD), ("b", GOOD)])
    store.record_result(record, "a", {"type": "succeeded", "message": {}})
    store.mark_canceling(record)  # then the server died before ending it
    engine = ScriptedEngine(text_script("x"))
    again = BatchStore(tmp_path)
    found = again.get(record.id)
    assert found.processing_status == "canceling"

    async def run() -> None:
        runner = BatchRunner(again, _services(engine), concurrency=1)
        runner.ensure_started()
        await _until(lambda: found.ended_at is not None)
        await runner.stop()

    asyncio.run(run())
    assert _results(again, found) == {"a": {"type": "succeeded", "message": {}}, "b": {"type": "canceled"}}
    assert engine.calls == []
