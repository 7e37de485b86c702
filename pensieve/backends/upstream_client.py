"""UpstreamClient: ``generate`` over HTTP to vLLM or SGLang replicas, in place of the engine.

The same surface the API layer uses of ``EngineClient`` (``generate``, ``overload``, and the
lifecycle ``serve_http`` drives), so routes, chat rendering, segmenting and tool parsing are
Pensieve's own whatever runs the model. The prompt goes upstream as token ids rendered by
Pensieve; the upstream streams token ids back and they go through Pensieve's detokenizer and
stop checks here, as in ``Engine._append``.

Leaving the ``generate`` loop early (client disconnect, stop sequence, the segmenter ending
the turn) closes the upstream HTTP stream; vLLM and SGLang abort a request whose connection
closes, which frees its slot and KV. Thinking budgets and the DRY loop guard need logits and
have no upstream equivalent: they are not applied (docs/deployment.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from pensieve.backends.upstream_config import UpstreamConfig
from pensieve.backends.upstream_replicas import Replica, ReplicaSet
from pensieve.backends.upstream_request import (
    PATHS,
    ChunkReader,
    UpstreamProtocolError,
    request_body,
    sse_data,
)
from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.errors import (
    EngineDeadError,
    EngineOverloadedError,
    EngineRequestRejected,
    PromptTooLongError,
)
from pensieve.engine.routing import routing_hint
from pensieve.engine.stop_checker import StopChecker
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams

log = logging.getLogger(__name__)
RETRY_STATUSES = frozenset({502, 503, 504})  # another replica may serve it


class UpstreamUnavailableError(EngineOverloadedError):
    """No replica accepted the request (all down or refusing): 529, retry later."""


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, tokenizer: Any, context_length: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.model_name = config.model or ""
        self.replicas = ReplicaSet(config.urls, config.health_path, config.health_interval_s,
                                   probe=self._probe)
        self.on_death = None  # serve_http sets it; an upstream client never dies by itself
        self.drained = False
        self._dead: str | None = None
        self._in_flight = 0
        self._http: httpx.AsyncClient | None = None

    # -- lifecycle (what serve_http uses) ------------------------------------------------
    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def start(self) -> None:
        self.replicas.check_all()
        self.replicas.start()

    def shutdown(self) -> None:
        self.replicas.stop()

    def drain(self, reason: str) -> None:
        self.drained = True
        self._dead = reason

    def overload(self) -> str | None:
        if self._dead is not None:
            return None
        if not self.replicas.any_healthy():
            return f"no upstream replica is healthy: {self.replicas.describe()}"
        if self._in_flight >= self.config.max_in_flight:
            return f"{self._in_flight} upstream requests in flight, the limit is {self.config.max_in_flight}"
        return None

    def _headers(self) -> dict[str, str]:
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        return {}

    def _probe(self, url: str) -> bool:
        return httpx.get(url, headers=self._headers(), timeout=self.config.connect_timeout_s).status_code == 200

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            timeout = httpx.Timeout(self.config.connect_timeout_s, read=self.config.read_timeout_s)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            self._http = httpx.AsyncClient(timeout=timeout, limits=limits, headers=self._headers())
        return self._http

    # -- generation ------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationDelta]:
        """Yield deltas until one has ``finish_reason``; see the module docstring."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLongError(len(prompt_ids), self.context_length)
        eos = frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_token_ids)
        body = request_body(self.config.dialect, self.model_name, prompt_ids, params,
                            frozenset(self.tokenizer.eos_token_ids))
        key = routing_hint.get().key
        headers = {"X-Request-Id": request_id}
        if key is not None:
            headers.update({name: key for name in self.config.routing_headers})
        self._in_flight += 1
        try:
            response, replica = await self._open(body, headers, key)
            try:
                run = _Generation(request_id, len(prompt_ids), params, self.tokenizer, eos,
                                  self.context_length)
                async for delta in run.stream(response, ChunkReader(self.config.dialect)):
                    yield delta
            finally:
                await response.aclose()  # mid-stream: closes the connection, the upstream aborts
                replica.in_flight -= 1
        finally:
            self._in_flight -= 1

    async def _open(self, body: dict[str, Any], headers: dict[str, str],
                    key: str | None) -> tuple[httpx.Response, Replica]:
        """The first replica (in ``key``'s order) that accepts the request, its response
        streaming; connection failures and 502/503/504 move on to the next."""
        path = PATHS[self.config.dialect]
        problems: list[str] = []
        for replica in self.replicas.order(key):
            request = self._client().build_request("POST", replica.url + path, json=body, headers=headers)
            try:
                response = await self._client().send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                self.replicas.mark(replica, False, f"{type(exc).__name__}: {exc}")
                problems.append(f"{replica.url}: {type(exc).__name__}")
                continue
            if response.status_code in RETRY_STATUSES:
                await response.aclose()
                self.replicas.mark(replica, False, f"HTTP {response.status_code}")
                problems.append(f"{replica.url}: HTTP {response.status_code}")
                continue
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                await response.aclose()
                raise UpstreamRequestError(response.status_code, text)
            replica.in_flight += 1
            if key is not None:
                log.debug("session %s → %s", key, replica.url)
            return response, replica
        raise UpstreamUnavailableError("no upstream replica accepted the request (" + "; ".join(problems) + ")")


class UpstreamRequestError(EngineRequestRejected):
    """The upstream refused the request itself (4xx): its message, passed on as a 400."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"the upstream answered {status}: {text[:1000]}")
        self.status = status


class _Generation:
    """One request's token ids → deltas: detokenise, stop checks, limits (Engine._append)."""

    def __init__(self, request_id: str, num_prompt: int, params: SamplingParams, tokenizer: Any,
                 eos: frozenset[int], context_length: int) -> None:
        self.request_id = request_id
        self.num_prompt = num_prompt
        self.params = params
        self.eos = eos
        self.context_length = context_length
        self.detok = IncrementalDetokenizer(tokenizer, eos)
        self.stop = StopChecker(params.stop_sequences)
        self.num_output = 0
        self.cached = 0

    async def stream(self, response: httpx.Response, reader: ChunkReader) -> AsyncIterator[GenerationDelta]:
        pending: GenerationDelta | None = None  # the last delta, held for the usage chunk
        upstream_done: str | None = None
        async for line in response.aiter_lines():
            data = sse_data(line)
            if data is None:
                continue
            chunk = reader.read(data)
            if chunk is None:
                break
            if chunk.cached_tokens is not None:
                self.cached = chunk.cached_tokens
            if chunk.error is not None:
                yield self._fail(chunk.error)
                return
            if pending is None:
                text, pending = self._tokens(chunk.token_ids)
                if pending is None and (text or chunk.token_ids):
                    yield self._delta(text, chunk.token_ids)
            upstream_done = upstream_done or chunk.finish_reason
            if pending is not None and pending.finish_reason is FinishReason.STOP_SEQUENCE \
                    and upstream_done is None:
                break  # a stop sequence the upstream does not know of: close the stream now
        if pending is None:
            pending = self._ended_upstream(upstream_done)
        pending.num_cached_tokens = min(self.cached, self.num_prompt)
        yield pending

    def _tokens(self, ids: list[int]) -> tuple[str, GenerationDelta | None]:
        """Text released by ``ids``, and the final delta when one of them ends the turn."""
        text = ""
        for token in ids:
            self.num_output += 1
            if token in self.eos:
                return "", self._finish(FinishReason.EOS, text + self._flush(), token)
            text += self.stop.feed(self.detok.add(token))
            if self.stop.matched is not None:
                return "", self._finish(FinishReason.STOP_SEQUENCE, text, token, self.stop.matched)
            if self.num_output >= self.params.max_tokens:
                return "", self._finish(FinishReason.MAX_TOKENS, text + self._flush(), token)
            if self.num_prompt + self.num_output >= self.context_length:
                return "", self._finish(FinishReason.CONTEXT, text + self._flush(), token)
        return text, None

    def _ended_upstream(self, reason: str | None) -> GenerationDelta:
        """The upstream ended the stream before Pensieve's checks did."""
        tail = self._flush()
        if reason == "length":
            full = self.num_prompt + self.num_output >= self.context_length
            return self._finish(FinishReason.CONTEXT if full else FinishReason.MAX_TOKENS, tail)
        if reason == "stop":  # its stop token or a completed grammar: the end of the turn
            return self._finish(FinishReason.EOS, tail)
        if reason is None:
            return self._fail("the upstream stream ended without a finish reason")
        return self._fail(f"the upstream ended the generation: {reason}")

    def _flush(self) -> str:
        tail = self.stop.feed(self.detok.flush())
        return tail + (self.stop.flush() if self.stop.matched is None else "")

    def _delta(self, text: str, ids: list[int]) -> GenerationDelta:
        return GenerationDelta(self.request_id, text=text, token_ids=list(ids),
                               num_prompt_tokens=self.num_prompt, num_output_tokens=self.num_output)

    def _finish(self, reason: FinishReason, text: str, token: int | None = None,
                stop: str | None = None) -> GenerationDelta:
        delta = self._delta(text, [] if token is None else [token])
        delta.finish_reason, delta.stop_sequence = reason, stop
        return delta

    def _fail(self, message: str) -> GenerationDelta:
        delta = self._delta("", [])
        delta.finish_reason, delta.error = FinishReason.ERROR, message
        return delta


__all__ = ["UpstreamClient", "UpstreamConfig", "UpstreamProtocolError", "UpstreamRequestError",
           "UpstreamUnavailableError"]
