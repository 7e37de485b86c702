"""Message Batches: ``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (list),
``GET …/{id}``, ``POST …/{id}/cancel``, ``DELETE …/{id}`` and ``GET …/{id}/results`` (JSONL).

The batches themselves live in ``api.batches`` (store on disk, background runner); this file
only speaks HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from pensieve.api.auth import require_api_key
from pensieve.api.batches import BatchConfig, BatchRunner, BatchStore
from pensieve.api.batches.models import BatchCreateParams, DeletedMessageBatch, MessageBatchList
from pensieve.api.batches.store import BatchRecord
from pensieve.api.body import parse_body, read_body
from pensieve.api.errors import ApiError, invalid_request
from pensieve.api.responses import json_response
from pensieve.api.state import Services

router = APIRouter(dependencies=[Depends(require_api_key)])

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000


@dataclass(frozen=True)
class Batches:
    config: BatchConfig
    store: BatchStore
    runner: BatchRunner


def install_batches(app: FastAPI, services: Services, config: BatchConfig) -> BatchRunner:
    """Mount the routes; the returned runner's ``lifespan`` starts and stops the work."""
    store = BatchStore(config.directory, config.expiry_s)

    async def services_for(name: str) -> Services:
        pool = getattr(app.state, "pool", None)  # several models: the one the request names
        return services if pool is None else await pool.acquire(name)

    runner = BatchRunner(store, services, config.concurrency, services_for)
    app.state.batches = Batches(config, store, runner)
    app.include_router(router)
    return runner


def _batches(request: Request) -> Batches:
    batches: Batches = request.app.state.batches
    batches.runner.ensure_started()  # also where the app runs without its lifespan
    return batches


def _results_url(request: Request, batch_id: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/v1/messages/batches/{batch_id}/results"


def _find(batches: Batches, batch_id: str) -> BatchRecord:
    record = batches.store.get(batch_id)
    if record is None:
        raise ApiError(404, "not_found_error", f"message batch {batch_id!r} not found")
    return record


def _wire(request: Request, record: BatchRecord) -> Response:
    return json_response(record.to_wire(_results_url(request, record.id)))


@router.post("/v1/messages/batches")
async def create_batch(request: Request) -> Response:
    batches = _batches(request)
    body = parse_body(BatchCreateParams, await read_body(request, batches.config.max_body_bytes))
    if len(body.requests) > batches.config.max_requests:
        raise invalid_request(f"requests: a batch holds at most {batches.config.max_requests} requests, "
                              f"got {len(body.requests)}")
    seen: set[str] = set()
    for entry in body.requests:
        if entry.custom_id in seen:
            raise invalid_request(f"requests: custom_id {entry.custom_id!r} is used more than once; "
                                  "each must be unique within the batch")
        seen.add(entry.custom_id)
    requests = [(entry.custom_id, entry.params) for entry in body.requests]
    record = await run_in_threadpool(batches.store.write_new, requests)  # off the event loop
    batches.store.add(record)
    batches.runner.wake()
    return _wire(request, record)


@router.get("/v1/messages/batches")
async def list_batches(request: Request) -> Response:
    batches = _batches(request)
    query = request.query_params
    limit = _limit(query.get("limit"))
    records = batches.store.listing()
    ids = [r.id for r in records]
    before, after = query.get("before_id"), query.get("after_id")
    if before is not None and after is not None:
        raise invalid_request("before_id and after_id cannot both be given")
    if before is not None:
        end = _position(ids, before, "before_id")
        start = max(0, end - limit)
        page, has_more = records[start:end], start > 0
    else:
        start = _position(ids, after, "after_id") + 1 if after is not None else 0
        page, has_more = records[start:start + limit], start + limit < len(records)
    data = [r.to_wire(_results_url(request, r.id)) for r in page]
    return json_response(MessageBatchList(data=data, has_more=has_more,
                                          first_id=data[0].id if data else None,
                                          last_id=data[-1].id if data else None))


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise invalid_request(f"limit: must be an integer from 1 to {MAX_LIMIT}, got {raw!r}")
    return int(raw)


def _position(ids: list[str], cursor: str, name: str) -> int:
    try:
        return ids.index(cursor)
    except ValueError:
        raise invalid_request(f"{name}: no message batch {cursor!r}") from None


@router.get("/v1/messages/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    return _wire(request, _find(_batches(request), batch_id))


@router.post("/v1/messages/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    batches = _batches(request)
    record = _find(batches, batch_id)
    if record.ended_at is None:
        await batches.runner.cancel(record)
    return _wire(request, record)


@router.delete("/v1/messages/batches/{batch_id}")
async def delete_batch(request: Request, batch_id: str) -> Response:
    batches = _batches(request)
    record = _find(batches, batch_id)
    if record.ended_at is None:
        raise invalid_request(f"message batch {batch_id} is still {record.processing_status}; "
                              "a batch can be deleted once it has ended (cancel it first)")
    batches.store.delete(record)
    return json_response(DeletedMessageBatch(id=batch_id))


@router.get("/v1/messages/batches/{batch_id}/results")
async def batch_results(request: Request, batch_id: str) -> Response:
    batches = _batches(request)
    record = _find(batches, batch_id)
    if record.ended_at is None:
        raise invalid_request(f"message batch {batch_id} is still {record.processing_status}; "
                              "its results are available once it has ended")
    return StreamingResponse(_lines(batches.store.results_path(record)), media_type="application/x-jsonl")


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f
