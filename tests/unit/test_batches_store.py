"""The Message Batches store on disk: what a restart finds, torn writes, duplicates, counts."""

from __future__ import annotations

import json

import pytest

from pensieve.api.batches.config import BatchConfig
from pensieve.api.batches.store import TMP_PREFIX, BatchStore

REQUESTS = [(f"r{i}", {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": str(i)}]})
            for i in range(4)]
OK = {"type": "succeeded", "message": {"id": "msg_1"}}


def test_a_restart_finds_the_batch_its_results_and_what_is_left(tmp_path):
    store = BatchStore(tmp_path)
    record = store.create(REQUESTS)
    store.record_result(record, "r1", OK)
    store.record_result(record, "r3", {"type": "errored", "error": {"type": "error"}})

    again = BatchStore(tmp_path)
    found = again.get(record.id)
    assert found is not None and found.ended_at is None and found.num_requests == 4
    assert found.done == {"r1": "succeeded", "r3": "errored"}
    assert [p.custom_id for p in again.pending(found)] == ["r0", "r2"]
    assert next(again.pending(found)).params == REQUESTS[0][1]
    assert found.created_at == record.created_at and found.expires_at == record.expires_at


def test_counts_are_all_processing_until_the_batch_ends(tmp_path):
    store = BatchStore(tmp_path)
    record = store.create(REQUESTS)
    store.record_result(record, "r0", OK)
    store.record_result(record, "r1", {"type": "errored", "error": {}})
    counts = record.counts()
    assert (counts.processing, counts.succeeded, counts.errored) == (4, 0, 0)
    assert record.to_wire("http://x/results").results_url is None
    store.mark_canceling(record)
    assert record.processing_status == "canceling"
    store.end(record, "canceled")
    counts = record.counts()
    assert (counts.processing, counts.succeeded, counts.errored, counts.canceled) == (0, 1, 1, 2)
    assert record.processing_status == "ended"
    assert record.to_wire("http://x/results").results_url == "http://x/results"
    lines = [json.loads(line) for line in store.results_path(record).read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["r0", "r1", "r2", "r3"]
    assert lines[3]["result"] == {"type": "canceled"}
    reread = BatchStore(tmp_path).get(record.id)
    assert reread.processing_status == "ended" and reread.cancel_initiated_at is not None


def test_a_torn_last_line_is_cut_and_its_request_runs_again(tmp_path):
    store = BatchStore(tmp_path)
    record = store.create(REQUESTS)
    store.record_result(record, "r0", OK)
    path = store.results_path(record)
    with path.open("ab") as f:
        f.write(b'{"custom_id":"r1","result":{"ty')  # killed mid-append
    again = BatchStore(tmp_path)
    found = again.get(record.id)
    assert found.done == {"r0": "succeeded"}
    assert path.read_text().count("\n") == 1 and path.read_text().endswith("\n")
    assert [p.custom_id for p in again.pending(found)] == ["r1", "r2", "r3"]


def test_a_second_result_for_a_request_is_never_written(tmp_path):
    store = BatchStore(tmp_path)
    record = store.create(REQUESTS)
    store.record_result(record, "r2", OK)
    store.record_result(record, "r2", {"type": "errored", "error": {}})
    assert store.results_path(record).read_text().count('"r2"') == 1
    assert record.done["r2"] == "succeeded"


def test_half_created_batches_are_removed_and_listing_is_newest_first(tmp_path):
    store = BatchStore(tmp_path)
    first, second = store.create(REQUESTS[:1]), store.create(REQUESTS[:2])
    (tmp_path / (TMP_PREFIX + "msgbatch_dead")).mkdir()
    again = BatchStore(tmp_path)
    assert [b.id for b in again.listing()] == [second.id, first.id]
    assert [b.id for b in again.unfinished()] == [first.id, second.id]
    assert not (tmp_path / (TMP_PREFIX + "msgbatch_dead")).exists()
    again.delete(again.get(first.id))
    assert not (tmp_path / first.id).exists() and [b.id for b in BatchStore(tmp_path).listing()] == [second.id]


def test_an_unreadable_batch_folder_is_skipped(tmp_path):
    store = BatchStore(tmp_path)
    good = store.create(REQUESTS[:1])
    (tmp_path / "msgbatch_broken").mkdir()
    (tmp_path / "msgbatch_broken" / "batch.json").write_text("{not json")
    assert [b.id for b in BatchStore(tmp_path).listing()] == [good.id]


def test_config_validates_and_expands_the_folder():
    assert "~" not in str(BatchConfig().directory)
    with pytest.raises(ValueError):
        BatchConfig(concurrency=0)
    with pytest.raises(ValueError):
        BatchConfig(expiry_s=0)
