"""Boundary doubles for API/chat tests: a scripted engine client and a character tokenizer."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams


class CharTokenizer:
    """One id per character; the special tokens written in the text are one id each."""

    SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
    CHAR_OFFSET = 100

    def __init__(self, *, add_bos: bool = False) -> None:
        self.bos_token = "<s>"
        self.eos_token = "</s>"
        self.bos_token_id = 0
        self.eos_token_ids = frozenset({1, 3})
        self.add_bos = add_bos
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.SPECIALS:
                ids.append(self.SPECIALS.index(piece))
            else:
                ids.extend(self.CHAR_OFFSET + ord(c) for c in piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.SPECIALS[i] if i < self.CHAR_OFFSET else chr(i - self.CHAR_OFFSET) for i in ids)


# A step of a script: a delta to yield, seconds to sleep, or an exception to raise.
Step = GenerationDelta | float | BaseException
Script = Callable[[list[int], SamplingParams, str], Sequence[Step]]


def text_script(*pieces: str, finish: FinishReason = FinishReason.EOS, stop_sequence: str | None = None,
                delay_s: float = 0.0) -> Script:
    """Yields ``pieces`` one per delta, then a final delta with ``finish``."""

    def script(prompt_ids: list[int], params: SamplingParams, request_id: str) -> list[Step]:
        steps: list[Step] = []
        for n, piece in enumerate(pieces, start=1):
            if delay_s:
                steps.append(delay_s)
            steps.append(GenerationDelta(request_id, text=piece, token_ids=[n],
                                         num_prompt_tokens=len(prompt_ids), num_output_tokens=n))
        steps.append(GenerationDelta(request_id, finish_reason=finish, stop_sequence=stop_sequence,
                                     num_prompt_tokens=len(prompt_ids), num_output_tokens=len(pieces) + 1))
        return steps

    return script


@dataclass
class Call:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str
    finished: bool = False
    aborted: threading.Event = field(default_factory=threading.Event)  # set from the server thread


class ScriptedEngine:
    """An EngineClient double: ``generate`` plays ``script`` and records every call.

    ``start_error`` is raised before any yield (like PromptTooLongError/EngineOverloadedError).
    A call that is left before its final delta is marked ``aborted``.
    """

    def __init__(self, script: Script, *, start_error: BaseException | None = None) -> None:
        self.script = script
        self.start_error = start_error
        self.calls: list[Call] = []
        self.overloaded: str | None = None  # what overload() answers

    def overload(self) -> str | None:
        return self.overloaded

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationDelta]:
        if self.start_error is not None:
            raise self.start_error
        call = Call(list(prompt_ids), params, request_id)
        self.calls.append(call)
        try:
            for step in self.script(prompt_ids, params, request_id):
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, (int, float)):
                    await asyncio.sleep(step)
                    continue
                if step.finish_reason is not None:
                    call.finished = True
                yield step
                if call.finished:
                    return
        finally:
            if not call.finished:
                call.aborted.set()


@contextmanager
def fake_server(engine: ScriptedEngine, *, template: str | None = None, add_bos: bool = False,
                **config: Any) -> Iterator[str]:
    """The real app over ``engine`` and a ``CharTokenizer``, on uvicorn; yields the base URL.

    ``config`` overrides ``ApiConfig`` fields (model_id defaults to ``tiny-model``,
    context_length to 4096).
    """
    from pensieve.api import ApiConfig, create_app
    from pensieve.chat import PromptRenderer
    from tests.helpers.server import serve_app_in_thread

    config.setdefault("model_id", "tiny-model")
    config.setdefault("context_length", 4096)
    app = create_app(ApiConfig(**config), engine, PromptRenderer(CharTokenizer(add_bos=add_bos), template))
    with serve_app_in_thread(app) as base_url:
        yield base_url
