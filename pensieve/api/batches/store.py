"""Message Batches on disk: one folder per batch, so that a restart loses none.

``<dir>/<batch id>/``:
- ``batch.json`` — id, times, number of requests (rewritten whole: temp file + rename);
- ``requests.jsonl`` — ``{"custom_id", "params"}`` per line, written once at creation;
- ``results.jsonl`` — one ``{"custom_id", "result"}`` line per finished request, appended and
  fsynced as each finishes: the results endpoint serves this file, and on start the requests
  without a line here are the ones to run again. A line torn by a crash is cut off; a
  ``custom_id`` seen twice keeps its first line, so a result is never served twice.

A batch is created in a hidden temporary folder and renamed into place, so a crash mid-create
leaves no half batch. Every method runs on the event loop's thread (files are small appends).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pensieve.api.batches.models import MessageBatch, MessageBatchRequestCounts

log = logging.getLogger(__name__)

RESULT_TYPES = ("succeeded", "errored", "canceled", "expired")
TMP_PREFIX = ".creating-"


def now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class BatchRecord:
    """What the server knows of one batch; ``done`` maps each finished custom_id to its
    result type (the results themselves stay on disk)."""

    id: str
    created_at: datetime
    expires_at: datetime
    num_requests: int
    cancel_initiated_at: datetime | None = None
    ended_at: datetime | None = None
    done: dict[str, str] = field(default_factory=dict)

    @property
    def processing_status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def counts(self) -> MessageBatchRequestCounts:
        """As the API reports them: every request counts as ``processing`` until the whole
        batch has ended; then each counts under its result."""
        if self.ended_at is None:
            return MessageBatchRequestCounts(processing=self.num_requests)
        tally = {kind: 0 for kind in RESULT_TYPES}
        for kind in self.done.values():
            tally[kind] += 1
        return MessageBatchRequestCounts(processing=self.num_requests - len(self.done), **tally)

    def to_wire(self, results_url: str | None) -> MessageBatch:
        return MessageBatch(
            id=self.id, processing_status=self.processing_status, request_counts=self.counts(),
            created_at=self.created_at, expires_at=self.expires_at, ended_at=self.ended_at,
            cancel_initiated_at=self.cancel_initiated_at,
            results_url=results_url if self.ended_at is not None else None,
        )

    def _meta(self) -> dict[str, Any]:
        stamp = lambda t: None if t is None else t.isoformat()  # noqa: E731
        return {"id": self.id, "created_at": stamp(self.created_at), "expires_at": stamp(self.expires_at),
                "num_requests": self.num_requests, "cancel_initiated_at": stamp(self.cancel_initiated_at),
                "ended_at": stamp(self.ended_at)}

    @classmethod
    def _from_meta(cls, meta: dict[str, Any]) -> BatchRecord:
        parse = lambda t: None if t is None else datetime.fromisoformat(t)  # noqa: E731
        return cls(id=meta["id"], created_at=parse(meta["created_at"]), expires_at=parse(meta["expires_at"]),
                   num_requests=int(meta["num_requests"]), cancel_initiated_at=parse(meta["cancel_initiated_at"]),
                   ended_at=parse(meta["ended_at"]))


@dataclass(frozen=True)
class PendingRequest:
    batch_id: str
    custom_id: str
    params: dict[str, Any]


class BatchStore:
    def __init__(self, directory: Path, expiry_s: float = 24 * 3600.0) -> None:
        self.directory = Path(directory)
        self.expiry_s = expiry_s
        self._batches: dict[str, BatchRecord] = {}
        self._loaded = False

    def load(self) -> None:
        """Read every batch under the directory (once); half-created ones are removed."""
        if self._loaded:
            return
        self._loaded = True
        if not self.directory.is_dir():
            return
        for entry in sorted(self.directory.iterdir()):
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
            elif (entry / "batch.json").is_file():
                try:
                    self._batches[entry.name] = self._read(entry)
                except (OSError, ValueError, KeyError) as exc:
                    log.error("batch folder %s is unreadable and is skipped: %s", entry, exc)
        unfinished = [b.id for b in self._batches.values() if b.ended_at is None]
        log.info("batches: %d in %s, %d unfinished", len(self._batches), self.directory, len(unfinished))

    def _read(self, folder: Path) -> BatchRecord:
        record = BatchRecord._from_meta(json.loads((folder / "batch.json").read_text()))
        results = folder / "results.jsonl"
        if results.exists():
            good = 0
            with results.open("rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        custom_id, kind = entry["custom_id"], entry["result"]["type"]
                    except (ValueError, KeyError, TypeError):
                        break  # torn by a crash mid-append: drop it and what follows
                    record.done.setdefault(custom_id, kind)
                    good += len(line)
            if good != results.stat().st_size:
                log.warning("batch %s: cutting a torn result line off %s", record.id, results)
                os.truncate(results, good)
        return record

    def create(self, requests: list[tuple[str, dict[str, Any]]]) -> BatchRecord:
        record = self.write_new(requests)
        self.add(record)
        return record

    def add(self, record: BatchRecord) -> None:
        """Register a batch ``write_new`` wrote (on the event loop's thread)."""
        self.load()
        self._batches[record.id] = record

    def write_new(self, requests: list[tuple[str, dict[str, Any]]]) -> BatchRecord:
        """Write a new batch's folder (any thread: a big batch takes a while to write and
        fsync); it is not served until ``add``."""
        batch_id = "msgbatch_" + secrets.token_hex(12)
        created = now()
        record = BatchRecord(id=batch_id, created_at=created, num_requests=len(requests),
                             expires_at=created + timedelta(seconds=self.expiry_s))
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (TMP_PREFIX + batch_id)
        tmp.mkdir()
        with (tmp / "requests.jsonl").open("w") as f:
            for custom_id, params in requests:
                f.write(json.dumps({"custom_id": custom_id, "params": params}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_meta(tmp, record)
        os.rename(tmp, self.directory / batch_id)
        return record

    def get(self, batch_id: str) -> BatchRecord | None:
        self.load()
        return self._batches.get(batch_id)

    def listing(self) -> list[BatchRecord]:
        """Every batch, most recent first (the API's order)."""
        self.load()
        return sorted(self._batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)

    def unfinished(self) -> list[BatchRecord]:
        """Batches still to run, oldest first."""
        return [b for b in reversed(self.listing()) if b.ended_at is None]

    def pending(self, record: BatchRecord) -> Iterator[PendingRequest]:
        """The requests of ``record`` without a result yet, in request order."""
        with (self.directory / record.id / "requests.jsonl").open() as f:
            for line in f:
                entry = json.loads(line)
                if entry["custom_id"] not in record.done:
                    yield PendingRequest(record.id, entry["custom_id"], entry["params"])

    def record_result(self, record: BatchRecord, custom_id: str, result: dict[str, Any]) -> None:
        """Append one result (fsynced before it counts as done); a second one is ignored."""
        if custom_id in record.done:
            log.warning("batch %s: a second result for %s is dropped", record.id, custom_id)
            return
        line = json.dumps({"custom_id": custom_id, "result": result}, separators=(",", ":")) + "\n"
        with (self.directory / record.id / "results.jsonl").open("ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        record.done[custom_id] = result["type"]

    def mark_canceling(self, record: BatchRecord) -> None:
        if record.cancel_initiated_at is None and record.ended_at is None:
            record.cancel_initiated_at = now()
            self._write_meta(self.directory / record.id, record)

    def end(self, record: BatchRecord, unfinished_as: str) -> None:
        """Every request still without a result ends as ``unfinished_as`` (canceled,
        expired); then the batch has ended."""
        for request in list(self.pending(record)):
            self.record_result(record, request.custom_id, {"type": unfinished_as})
        record.ended_at = now()
        self._write_meta(self.directory / record.id, record)

    def results_path(self, record: BatchRecord) -> Path:
        return self.directory / record.id / "results.jsonl"

    def delete(self, record: BatchRecord) -> None:
        del self._batches[record.id]
        shutil.rmtree(self.directory / record.id, ignore_errors=True)

    @staticmethod
    def _write_meta(folder: Path, record: BatchRecord) -> None:
        tmp = folder / "batch.json.tmp"
        with tmp.open("w") as f:
            json.dump(record._meta(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / "batch.json")
