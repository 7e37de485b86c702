"""Message Batches on the real server with the real SmolLM2 model, driven by the official
anthropic SDK's ``client.messages.batches``; and a batch of 50 that survives the server being
killed (SIGKILL, then SIGTERM) mid-batch and restarted on the same batch folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import pytest

from tests.helpers.real_server import _wait_ready, pensieve_server
from tests.helpers.server import free_port

pytestmark = pytest.mark.slow
WAIT_S = 600.0  # generous: CI's 2 busy cores


def _params(text: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": text}], **extra}


def _wait_ended(client: anthropic.Anthropic, batch_id: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} did not end in {WAIT_S} s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batches")
    with pensieve_server("--batch-dir", str(folder), "--batch-concurrency", "2") as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0), folder


def test_create_retrieve_results_list_and_delete(served):
    client, folder = served
    requests = [
        {"custom_id": "paris", "params": _params("What is the capital of France?", 16)},
        {"custom_id": "colours", "params": _params("Name two colours.")},
        {"custom_id": "no-max-tokens", "params": {"model": "claude-haiku-4-5",
                                                  "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "streamed", "params": _params("hi", stream=True)},
    ]
    batch = client.messages.batches.create(requests=requests)
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 4 and batch.ended_at is None
    assert (batch.expires_at - batch.created_at).total_seconds() == pytest.approx(24 * 3600, abs=1)
    with pytest.raises(anthropic.BadRequestError):  # not deletable while it runs
        client.messages.batches.delete(batch.id)

    ended = _wait_ended(client, batch.id)
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.processing, counts.canceled) == (2, 2, 0, 0)
    assert ended.ended_at >= ended.created_at and ended.results_url.endswith(f"/{batch.id}/results")
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert sorted(results) == sorted(r["custom_id"] for r in requests)
    assert results["paris"].type == "succeeded" and "Paris" in results["paris"].message.content[0].text
    assert results["colours"].message.usage.output_tokens > 0
    assert results["no-max-tokens"].type == "errored"
    assert results["no-max-tokens"].error.error.type == "invalid_request_error"
    assert "max_tokens" in results["no-max-tokens"].error.error.message
    assert results["streamed"].error.error.type == "invalid_request_error"
    assert (folder / batch.id / "results.jsonl").is_file()

    listed = [b.id for b in client.messages.batches.list()]
    assert batch.id in listed
    deleted = client.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in client.messages.batches.list()]
    assert not (folder / batch.id).exists()


def test_list_pages_newest_first(served):
    client, _ = served
    ids = [client.messages.batches.create(requests=[{"custom_id": "a", "params": _params("hi", 1)}]).id
           for _ in range(3)]
    page = client.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert page.first_id == ids[2] and page.last_id == ids[1]
    walked = [b.id for b in client.messages.batches.list(limit=1)]  # the SDK follows after_id
    assert walked[:3] == ids[::-1]
    before = client.messages.batches.list(limit=5, before_id=ids[0])
    assert [b.id for b in before.data] == [ids[2], ids[1]] and not before.has_more
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.list(limit=0)
    for batch_id in ids:
        _wait_ended(client, batch_id)


def test_cancel_ends_unfinished_requests_as_canceled(served):
    client, _ = served
    requests = [{"custom_id": f"r{i}", "params": _params(f"Count to {i + 20}.", 48)} for i in range(12)]
    batch = client.messages.batches.create(requests=requests)
    canceled = client.messages.batches.cancel(batch.id)
    assert canceled.cancel_initiated_at is not None
    assert canceled.processing_status in ("canceling", "ended")
    ended = _wait_ended(client, batch.id)
    counts = ended.request_counts
    assert counts.canceled >= 1
    assert counts.canceled + counts.succeeded + counts.errored == 12 and counts.processing == 0
    kinds = [r.result.type for r in client.messages.batches.results(batch.id)]
    assert len(kinds) == 12 and kinds.count("canceled") == counts.canceled


def test_interactive_requests_are_answered_while_a_batch_runs(served):
    client, _ = served
    batch = client.messages.batches.create(
        requests=[{"custom_id": f"r{i}", "params": _params("Write a long story.", 64)} for i in range(6)])
    params = _params("What is the capital of France?", 16)
    temperature = params.pop("temperature")
    answer = client.messages.create(**params, extra_body={"temperature": temperature})
    assert "Paris" in answer.content[0].text
    assert client.messages.batches.retrieve(batch.id).processing_status == "in_progress"
    client.messages.batches.cancel(batch.id)
    _wait_ended(client, batch.id)


def _start(folder: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pensieve.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "info", "--batch-dir", str(folder), "--batch-concurrency", "4"]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=dict(os.environ))
    _wait_ready(proc, f"http://127.0.0.1:{port}", log)
    return proc


def _results_on_disk(folder: Path, batch_id: str) -> int:
    path = folder / batch_id / "results.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _run_until(proc: subprocess.Popen, folder: Path, batch_id: str, at_least: int, sig: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while _results_on_disk(folder, batch_id) < at_least:
        assert time.monotonic() < deadline, "the batch made no progress"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return _results_on_disk(folder, batch_id)


def test_batch_of_50_completes_through_restarts_without_duplicates(tmp_path):
    folder, log, port = tmp_path / "batches", tmp_path / "server.log", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(folder, port, log)
    try:
        client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=2)
        requests = [{"custom_id": f"req-{i:02d}", "params": _params(f"Say the number {i}.", 6)}
                    for i in range(50)]
        batch_id = client.messages.batches.create(requests=requests).id
        after_kill = _run_until(proc, folder, batch_id, 5, signal.SIGKILL)
        assert after_kill < 50, "the batch finished before the kill; nothing was interrupted"
        proc = _start(folder, port, log)  # resumes the unfinished requests
        assert client.messages.batches.retrieve(batch_id).processing_status == "in_progress"
        after_term = _run_until(proc, folder, batch_id, after_kill + 5, signal.SIGTERM)
        assert after_term < 50 and proc.returncode is not None
        proc = _start(folder, port, log)
        ended = _wait_ended(client, batch_id)
        assert ended.request_counts.succeeded == 50 and ended.request_counts.errored == 0
        lines = [json.loads(line) for line in (folder / batch_id / "results.jsonl").read_text().splitlines()]
        ids = [line["custom_id"] for line in lines]
        assert len(ids) == 50 and sorted(ids) == sorted(r["custom_id"] for r in requests)
        results = list(client.messages.batches.results(batch_id))
        assert len(results) == 50 and all(r.result.type == "succeeded" for r in results)
        assert all(r.result.message.content and r.result.message.usage.output_tokens > 0 for r in results)
    finally:
        proc.kill()
        proc.wait()
