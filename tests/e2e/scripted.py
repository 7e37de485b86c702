"""A scripted token source at the engine boundary, and a recorder of request bodies.

``ScriptedTokenEngine`` stands in for the model only: it picks a reply by what the rendered
prompt holds, encodes it with the real tokenizer and yields it token by token through the
real incremental detokenizer — everything after that (segmenter, tool parser, event builder,
SSE) is the server's own path. ``RecordingApp`` wraps the ASGI app and keeps every POSTed
JSON body, so a test sees exactly what Claude Code sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pensieve.engine.detokenizer import IncrementalDetokenizer
from pensieve.engine.types import FinishReason, GenerationDelta, SamplingParams
from pensieve.loaders.tokenizer import TextTokenizer


@dataclass
class ScriptedCall:
    prompt: str  # the rendered prompt, decoded
    params: SamplingParams
    reply: str


class ScriptedTokenEngine:
    """A GenerationClient double: ``reply(prompt_text)`` → the text to "generate"."""

    def __init__(self, tokenizer: TextTokenizer, reply: Callable[[str], str]) -> None:
        self.tokenizer = tokenizer
        self.reply = reply
        self.calls: list[ScriptedCall] = []

    def overload(self) -> str | None:
        return None

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationDelta]:
        prompt = self.tokenizer.decode(prompt_ids)
        text = self.reply(prompt)
        self.calls.append(ScriptedCall(prompt, params, text))
        ids = self.tokenizer.encode(text)
        finish = FinishReason.EOS
        if len(ids) > params.max_tokens:
            ids, finish = ids[: params.max_tokens], FinishReason.MAX_TOKENS
        detok = IncrementalDetokenizer(self.tokenizer)
        counts = {"num_prompt_tokens": len(prompt_ids)}
        for n, token_id in enumerate(ids, start=1):
            yield GenerationDelta(request_id, text=detok.add(token_id), token_ids=[token_id],
                                  num_output_tokens=n, **counts)
            await asyncio.sleep(0)  # a real engine yields between tokens too
        yield GenerationDelta(request_id, text=detok.flush(), finish_reason=finish,
                              num_output_tokens=len(ids), **counts)


@dataclass
class RecordingApp:
    """ASGI wrapper: ``bodies`` holds (path, parsed JSON body) of every POST, in order."""

    app: Any
    bodies: list[tuple[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def recording_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self._keep(scope["path"], b"".join(chunks))
            return message

        await self.app(scope, recording_receive, send)

    def _keep(self, path: str, raw: bytes) -> None:
        try:
            self.bodies.append((path, json.loads(raw)))
        except ValueError:
            self.bodies.append((path, raw.decode(errors="replace")))

    def messages_bodies(self) -> list[dict]:
        return [b for p, b in self.bodies if p == "/v1/messages" and isinstance(b, dict)]
