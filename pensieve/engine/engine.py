"""The synchronous engine: ``step()`` schedules, runs the model, samples and post-processes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from pensieve.engine.block_pool import BlockPool
from pensieve.engine.config import EngineConfig
from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.errors import PromptTooLongError
from pensieve.engine.grammar import GrammarCompiler
from pensieve.engine.kv_manager import KVCacheManager
from pensieve.engine.logits_processors import LogitsProcessor, ThinkingBudgetProcessor, accept_token
from pensieve.engine.model_runner import ModelRunner
from pensieve.engine.repetition import DryProcessor, breaker_ids
from pensieve.engine.request import Request, RequestStatus
from pensieve.engine.sampler import make_generator, sample
from pensieve.engine.scheduler import ScheduledChunk, Scheduler
from pensieve.engine.stop_checker import StopChecker
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams
from pensieve.models.args import ModelArgs

if TYPE_CHECKING:
    from pensieve.loaders.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class Engine:
    """Not thread-safe: one thread calls ``add_request``/``abort``/``step``."""

    def __init__(
        self, model: nn.Module, args: ModelArgs, tokenizer: "TextTokenizer", config: EngineConfig
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, args, config)
        capacity = self.runner.num_blocks * config.block_size
        if capacity < config.context_length:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, less than one context of "
                f"{config.context_length}: raise num_kv_blocks or lower context_length"
            )
        self.pool = BlockPool(self.runner.num_blocks)
        self.kv = KVCacheManager(self.pool, config.block_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self._requests: dict[str, Request] = {}
        self._vocab_size = args.vocab_size
        self._grammars: GrammarCompiler | None = None  # built by the first constrained request
        self._processors: dict[str, list[LogitsProcessor]] = {}  # request id → its processors
        self._dry_breakers: torch.Tensor | None = None  # built by the first loop-guarded request

    @property
    def context_length(self) -> int:
        return self.config.context_length

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
        processors = self._logits_processors(req)
        self._requests[request_id] = req
        if processors:
            self._processors[request_id] = processors
        self.scheduler.add(req)

    def _logits_processors(self, req: Request) -> list[LogitsProcessor]:
        """The loop guard first (it sees every token, thinking included), then the thinking
        budget: while thinking is open it pauses the grammar after it."""
        processors: list[LogitsProcessor] = []
        params = req.params
        if params.dry is not None and params.dry.multiplier > 0:
            if self._dry_breakers is None:
                self._dry_breakers = breaker_ids(lambda i: self.tokenizer.decode([i]), self._vocab_size)
            processors.append(DryProcessor(params.dry, self._dry_breakers))
        if params.thinking_budget is not None:
            processors.append(ThinkingBudgetProcessor(params.thinking_budget))
        if params.grammar is not None:
            if self._grammars is None:  # raises GrammarUnavailableError without xgrammar
                self._grammars = GrammarCompiler(self.tokenizer, self._vocab_size)
            processors.append(self._grammars.constraint(params.grammar, lambda: self._tokens_left(req)))
        return processors

    def _tokens_left(self, req: Request) -> int:
        """Tokens ``req`` may still generate, counting the one about to be sampled."""
        return min(req.params.max_tokens - len(req.output_ids), self.context_length - req.num_tokens)

    def abort(self, request_id: str) -> GenerationDelta | None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        self._processors.pop(request_id, None)
        self.scheduler.finish(req)
        req.finish(FinishReason.ABORTED)
        return self._delta(req, "")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[GenerationDelta]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        sampled = [c.request for c in chunks if c.completes]
        logits = self.runner.run(chunks)
        for chunk in chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.kv.commit(chunk.request)
        tokens = sample(
            logits, [r.params for r in sampled], [r.generator for r in sampled],
            [self._processors.get(r.request_id) for r in sampled],
        )
        return [self._append(req, tok) for req, tok in zip(sampled, tokens)]

    def _append(self, req: Request, token: int) -> GenerationDelta:
        if not req.output_ids:  # prefill done: what it added to the prefix cache
            prompt_blocks = min(len(req.block_hashes), len(req.prompt_ids) // self.config.block_size)
            cached_now = prompt_blocks * self.config.block_size
            req.num_new_cached_tokens = max(0, cached_now - req.num_cached_tokens)
        req.output_ids.append(token)
        processors = self._processors.get(req.request_id)
        constraint_done = processors is not None and accept_token(processors, token)
        if token in self.tokenizer.eos_token_ids and not req.params.ignore_eos:
            return self._finish(req, FinishReason.EOS, self._flush(req))
        text = req.stop_checker.feed(req.detokenizer.add(token))
        if req.stop_checker.matched is not None:
            return self._finish(req, FinishReason.STOP_SEQUENCE, text, req.stop_checker.matched)
        if constraint_done:  # the grammar allows nothing but the end of the turn
            return self._finish(req, FinishReason.EOS, text + self._flush(req))
        if len(req.output_ids) >= req.params.max_tokens:
            return self._finish(req, FinishReason.MAX_TOKENS, text + self._flush(req))
        if req.num_tokens >= self.context_length:
            return self._finish(req, FinishReason.CONTEXT, text + self._flush(req))
        return self._delta(req, text, [token])

    def _flush(self, req: Request) -> str:
        tail = req.stop_checker.feed(req.detokenizer.flush())
        if req.stop_checker.matched is None:
            tail += req.stop_checker.flush()
        return tail

    def _finish(
        self, req: Request, reason: FinishReason, text: str, stop: str | None = None
    ) -> GenerationDelta:
        self.scheduler.finish(req)
        self._requests.pop(req.request_id, None)
        self._processors.pop(req.request_id, None)
        req.finish(reason, stop)
        return self._delta(req, text, [req.output_ids[-1]])

    def _delta(self, req: Request, text: str, token_ids: list[int] | None = None) -> GenerationDelta:
        return GenerationDelta(
            request_id=req.request_id,
            text=text,
            token_ids=token_ids or [],
            finish_reason=req.finish_reason,
            stop_sequence=req.stop_sequence,
            num_prompt_tokens=len(req.prompt_ids),
            num_cached_tokens=req.num_cached_tokens,
            num_new_cached_tokens=req.num_new_cached_tokens,
            num_output_tokens=len(req.output_ids),
        )

    def fail_all(self, message: str) -> list[GenerationDelta]:
        """After an unexpected error in ``step``: end every request with an error delta."""
        deltas = []
        for req in list(self._requests.values()):
            self.scheduler.finish(req)
            req.finish(FinishReason.ERROR)
            req.error = message
            d = self._delta(req, "")
            d.error = message
            deltas.append(d)
        self._requests.clear()
        self._processors.clear()
        return deltas


