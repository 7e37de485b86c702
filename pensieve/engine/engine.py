"""The engine: ``step()`` schedules, runs the model, samples and post-processes.

Async scheduling (``EngineConfig.async_scheduling``, on by default on CUDA): while every
running request is decoding, a step is launched with the previous step's sampled ids still
on the device, and the previous step's tokens are read and post-processed (detokenise, stop
checks, streaming) while the GPU runs the new one. Requests with logits processors (grammar,
loop guard, thinking budget) need their last token on the host before their next mask: then
the previous step is read while the new step's forward runs, its tokens advance the
processors, and only then are the new logits masked and sampled; new requests join such steps where the
runner can mix them in (short prompts on CUDA). A request that ends on the token read late
wastes one step's row; the ids its extra row computed are dropped. Whenever that condition
fails (KV is short, a request is one token from its limit, a step the runner cannot feed from
the device) the step in flight lands first and the step runs synchronously.

Grammars: a request whose grammar is still compiling waits in ``WAITING_FOR_GRAMMAR``, out of
the scheduler's reach, while the others keep stepping; each step admits those whose compile
finished, failed or timed out (``GrammarConstraint.ready``: a timeout degrades the constraint).
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, wait
from typing import TYPE_CHECKING

import torch

from pensieve.engine.config import EngineConfig
from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.errors import PromptTooLongError
from pensieve.engine.grammar import GrammarCompiler
from pensieve.engine.grammar_constraint import GrammarConstraint
from pensieve.engine.inflight import FAILED_ROW, InFlight, Landing
from pensieve.engine.kv_groups import kv_manager_for
from pensieve.engine.logits_processors import LogitsProcessor, accept_token
from pensieve.engine.request import Request, RequestStatus
from pensieve.engine.request_processors import RequestProcessors
from pensieve.engine.runner import Runner
from pensieve.engine.sampler import NON_FINITE, apply_rows, make_generator, sample_ids, sample_rows
from pensieve.engine.scheduler import Scheduler
from pensieve.engine.stop_checker import StopChecker
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams

if TYPE_CHECKING:
    from pensieve.loaders.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

GRAMMAR_IDLE_WAIT_S = 0.01  # with nothing else to run, a step waits this long for a compile


class Engine:
    """Not thread-safe: one thread calls ``add_request``/``abort``/``step``."""

    def __init__(self, runner: Runner, tokenizer: "TextTokenizer", config: EngineConfig,
                 vocab_size: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        capacity = self.runner.num_blocks * config.block_size
        if capacity < config.context_length:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, less than one context of "
                f"{config.context_length}: raise num_kv_blocks or lower context_length"
            )
        self.kv = kv_manager_for(getattr(runner, "cache_plan", None), runner.num_blocks,
                                 config.block_size, config.enable_prefix_cache)
        self.pool = self.kv.pool  # the first layer group's (full attention where there is any)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.aging_steps)
        self._requests: dict[str, Request] = {}
        self._vocab_size = vocab_size
        self._processor_source = RequestProcessors(tokenizer, vocab_size, config)
        self._processors: dict[str, list[LogitsProcessor]] = {}  # request id → its processors
        # request id → its processors' outcome for the token in flight, fed by _accept_early
        self._accepted: dict[str, bool | Exception] = {}
        # requests in WAITING_FOR_GRAMMAR, in arrival order, with the constraint they wait for
        self._compiling: dict[str, tuple[Request, GrammarConstraint]] = {}
        self._overlap = config.overlap_steps
        self.last_step_tokens = 0  # tokens the last step ran through the model (for logs)
        self.last_step_chained = False  # launched on the previous step's ids still on the device
        self._inflight: InFlight | None = None
        self._landing = Landing(config.max_num_seqs,
                                pinned=self._overlap and torch.device(config.device).type == "cuda")

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Raise PromptTooLongError unless the prompt leaves room for one output token."""
        if num_prompt_tokens >= self.context_length:
            raise PromptTooLongError(num_prompt_tokens, self.context_length)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.check_prompt(len(prompt_ids))
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        eos = frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids
        req = Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, eos),
            stop_checker=StopChecker(params.stop_sequences),
            generator=make_generator(params.seed, self.config.device),
        )
        processors = self._processor_source.build(params, lambda: self._tokens_left(req))
        self._requests[request_id] = req
        if processors:
            self._processors[request_id] = processors
        grammar = next((p for p in processors if isinstance(p, GrammarConstraint)), None)
        if grammar is not None and not grammar.ready():
            req.status = RequestStatus.WAITING_FOR_GRAMMAR
            self._compiling[request_id] = (req, grammar)
        else:
            self.scheduler.add(req)

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler, built on first use (GrammarUnavailableError without xgrammar)."""
        return self._processor_source.grammars

    def _tokens_left(self, req: Request) -> int:
        """Tokens ``req`` may still generate, counting the one about to be sampled (and not
        the ones sampled but not read yet: ``num_inflight``)."""
        return min(req.params.max_tokens - len(req.output_ids) - req.num_inflight,
                   self.context_length - req.num_tokens)

    def abort(self, request_id: str) -> GenerationDelta | None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._forget(req)
        req.finish(FinishReason.ABORTED)
        if self._inflight is not None and all(r.is_finished for r in self._inflight.requests):
            self._inflight = None  # nothing left to read from it (its pinned copy stays valid)
        return req.delta("")

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None or bool(self._compiling)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued, or waiting for their grammar."""
        return len(self.scheduler.waiting) + len(self._compiling)

    @property
    def num_free_blocks(self) -> int:
        """KV blocks free for new requests (cached prefixes among them may be evicted)."""
        return self.pool.num_free

    def step(self) -> list[GenerationDelta]:
        self._admit_compiled()
        deltas = self._land() if self._inflight is not None and not self._can_chain() else []
        chunks = self.scheduler.schedule()
        self.last_step_tokens = sum(c.num_tokens for c in chunks)
        if not chunks:
            if self._inflight is None:
                self._wait_for_compiles()
            return deltas + self._land()
        sampled = [c.request for c in chunks if c.completes]
        chain = self._overlap and self.runner.can_carry(chunks)
        self.last_step_chained = chain
        if not chain and self._inflight is not None:  # scheduled on ids still in flight: read them
            deltas += self._land()
            chunks = [c for c in chunks if not c.request.is_finished]
            sampled = [c.request for c in chunks if c.completes]
            if not chunks:
                return deltas
        previous = self._inflight
        if previous is not None:
            rows = {id(r): i for i, r in enumerate(previous.requests)}
            carried_rows = [rows[id(c.request)] if c.request.num_inflight else -1 for c in chunks]
            logits = self.runner.run(chunks, previous.ids, carried_rows)
        else:
            logits = self.runner.run(chunks)
        for chunk in chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.commit(chunk.request)
        params, generators = [r.params for r in sampled], [r.generator for r in sampled]
        if not chain:
            rows = sample_rows(logits, params, generators,
                               [self._processors.get(r.request_id) for r in sampled])
            return deltas + [self._fail(req, rows.failed[i]) if i in rows.failed else self._post(req, tok)
                             for i, (req, tok) in enumerate(zip(sampled, rows.ids))]
        processors = [self._processors.get(r.request_id) for r in sampled]
        if previous is not None and any(processors):
            # the processors see the tokens in flight before they mask the next ones: feed
            # them now, while the model runs this step; detokenising, stop checks and the
            # deltas wait until this step's sampling is launched (requests ending waste a row)
            ending = self._accept_early(previous)
            processors = [None if id(r) in ending else p for r, p in zip(sampled, processors)]
        failed = apply_rows(logits, processors)
        self._inflight = self._landing.launch(sampled, *sample_ids(logits, params, generators), failed)
        return deltas + (self._read(previous) if previous is not None else [])

    def _admit_compiled(self) -> None:
        """Hand the scheduler every request whose grammar is ready (compiled, failed or
        degraded after its timeout), in arrival order."""
        for rid, (req, grammar) in list(self._compiling.items()):
            if grammar.ready():
                del self._compiling[rid]
                req.status = RequestStatus.WAITING
                self.scheduler.add(req)

    def _wait_for_compiles(self) -> None:
        """Nothing to run but requests waiting for grammars: wait briefly for a compile rather
        than spin (the caller's loop takes new requests and aborts between steps)."""
        futures = [f for _, g in self._compiling.values() if (f := g.compiling) is not None]
        if futures:
            wait(futures, timeout=GRAMMAR_IDLE_WAIT_S, return_when=FIRST_COMPLETED)

    def _can_chain(self) -> bool:
        """Whether the next step may be scheduled before the step in flight lands: every
        running request is decoding on an id in flight, none is one token from its limit, and KV has a block for each (so scheduling preempts nobody; waiting
        requests are admitted only into free blocks)."""
        s = self.scheduler
        if not self.kv.num_free_for(len(s.running)) or s.must_seat_urgent():
            return False  # scheduling would preempt: never a request whose token is in flight
        return all(
            r.num_inflight and len(r.output_ids) + r.num_inflight < r.params.max_tokens
            and r.num_tokens < self.context_length
            for r in s.running
        )

    def _land(self) -> list[GenerationDelta]:
        """Wait for the step in flight, if any, and post-process its tokens."""
        flight, self._inflight = self._inflight, None
        return self._read(flight) if flight is not None else []

    def _read(self, flight: InFlight) -> list[GenerationDelta]:
        """Read a launched step's sampled ids and post-process them."""
        deltas = []
        for row, (req, token) in enumerate(zip(flight.requests, flight.host_ids())):
            req.num_inflight -= 1
            if req.is_finished:  # aborted, or ended on an earlier token: a wasted row
                continue
            if token == FAILED_ROW:
                deltas.append(self._fail(req, flight.failed.get(row, NON_FINITE)))
                continue
            deltas.append(self._post(req, token))
            if not req.is_finished:  # its blocks that this token completes join the prefix cache
                self.kv.commit(req)
        return deltas

    def _accept_early(self, flight: InFlight) -> set[int]:
        """Feed a landed step's tokens to their requests' processors ahead of ``_read`` (which
        then takes the outcome from ``_accepted``); the ``id``s of requests that end on these
        tokens (end of turn, grammar done, a processor failed): their next row is not masked."""
        ending: set[int] = set()
        for req, token in zip(flight.requests, flight.host_ids()):
            processors = self._processors.get(req.request_id)
            if req.is_finished or processors is None or token == FAILED_ROW:
                continue
            if token in self.tokenizer.eos_token_ids and not req.params.ignore_eos:
                self._accepted[req.request_id] = False  # the turn ends on it: nothing to advance
                ending.add(id(req))
                continue
            try:
                done: bool | Exception = accept_token(processors, token)
            except Exception as exc:
                done = exc
            self._accepted[req.request_id] = done
            if done is not False:
                ending.add(id(req))
        return ending

    def _post(self, req: Request, token: int) -> GenerationDelta:
        """``_append``, with a failure there (grammar, detokenizer, stop check) ending only
        ``req``."""
        try:
            return self._append(req, token)
        except Exception as exc:
            log.exception("request %s failed after token %d", req.request_id, token)
            return self._fail(req, f"generation failed: {type(exc).__name__}: {exc}")

    def _append(self, req: Request, token: int) -> GenerationDelta:
        if not req.output_ids:  # prefill done: what it added to the prefix cache
            prompt_blocks = min(len(req.block_hashes), len(req.prompt_ids) // self.config.block_size)
            cached_now = prompt_blocks * self.config.block_size
            req.num_new_cached_tokens = max(0, cached_now - req.num_cached_tokens)
        req.output_ids.append(token)
        processors = self._processors.get(req.request_id)
        early = self._accepted.pop(req.request_id, None)  # fed by _accept_early already
        if isinstance(early, Exception):
            raise early
        constraint_done = early if early is not None else (
            processors is not None and accept_token(processors, token))
        if token in self.tokenizer.eos_token_ids and not req.params.ignore_eos:
            return self._finish(req, FinishReason.EOS, self._flush(req))
        text = req.stop_checker.feed(req.detokenizer.add(token))
        if req.stop_checker.matched is not None:
            return self._finish(req, FinishReason.STOP_SEQUENCE, text, req.stop_checker.matched)
        if constraint_done:  # the grammar allows nothing but the end of the turn
            return self._finish(req, FinishReason.EOS, text + self._flush(req))
        if len(req.output_ids) >= req.params.max_tokens:
            return self._finish(req, FinishReason.MAX_TOKENS, text + self._flush(req))
        if req.num_known_tokens >= self.context_length:
            return self._finish(req, FinishReason.CONTEXT, text + self._flush(req))
        return req.delta(text, [token])

    def _flush(self, req: Request) -> str:
        tail = req.stop_checker.feed(req.detokenizer.flush())
        if req.stop_checker.matched is None:
            tail += req.stop_checker.flush()
        return tail

    def _finish(
        self, req: Request, reason: FinishReason, text: str, stop: str | None = None
    ) -> GenerationDelta:
        self._forget(req)
        req.finish(reason, stop)
        return req.delta(text, [req.output_ids[-1]])

    def _forget(self, req: Request) -> None:
        """Drop ``req`` from the scheduler and every table of the engine's (it is ending)."""
        self.scheduler.finish(req)
        for table in (self._requests, self._processors, self._accepted, self._compiling):
            table.pop(req.request_id, None)

    def _fail(self, req: Request, message: str) -> GenerationDelta:
        """End ``req`` alone with an error delta; the others keep running."""
        self._forget(req)
        req.finish(FinishReason.ERROR)
        req.error = message
        return req.delta("")

    def fail_all(self, message: str) -> list[GenerationDelta]:
        """After an unexpected error in ``step``: end every request with an error delta."""
        deltas = [self._fail(req, message) for req in list(self._requests.values())]
        self._inflight = None
        return deltas


