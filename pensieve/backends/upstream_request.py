"""What goes to an upstream engine and what comes back, as plain data (no I/O here).

Two dialects:

- ``vllm``: ``POST /v1/completions`` with the prompt as token ids, ``return_token_ids`` so that
  every streamed chunk carries the ids it generated (Pensieve detokenises them itself), usage
  on the last chunk (``stream_options.include_usage``; cached prompt tokens in
  ``usage.prompt_tokens_details.cached_tokens`` when the server runs with
  ``--enable-prompt-tokens-details``), and a tool-call grammar or JSON schema as vLLM's
  ``structured_outputs`` (``json`` / ``grammar`` / ``structural_tag``).
- ``sglang``: ``POST /generate`` with ``input_ids``; constraints as ``json_schema`` / ``ebnf`` /
  ``structural_tag`` in ``sampling_params``; each streamed chunk's ``output_ids`` are the ids so
  far, cached prompt tokens in ``meta_info.cached_tokens``.

Stop sequences stay with Pensieve (it sees the text as it is detokenised and closes the
stream on a match); end-of-turn ids are sent as ``stop_token_ids`` so the upstream ends where
Pensieve's own engine would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pensieve.engine.types import GrammarSpec, SamplingParams

Dialect = Literal["vllm", "sglang"]
DIALECTS: tuple[Dialect, ...] = ("vllm", "sglang")
PATHS: dict[Dialect, str] = {"vllm": "/v1/completions", "sglang": "/generate"}


class UpstreamProtocolError(ValueError):
    """The upstream answered something this dialect does not describe."""


def request_body(dialect: Dialect, model: str, prompt_ids: list[int], params: SamplingParams,
                 stop_token_ids: frozenset[int]) -> dict[str, Any]:
    """The JSON body of one streamed generation."""
    if dialect == "sglang":
        return _sglang_body(prompt_ids, params, stop_token_ids)
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "skip_special_tokens": False,
        "ignore_eos": params.ignore_eos,
    }
    if params.top_k > 0:
        body["top_k"] = params.top_k
    if params.seed is not None:
        body["seed"] = params.seed
    if stop_token_ids and not params.ignore_eos:
        body["stop_token_ids"] = sorted(stop_token_ids)
    constraint = structured_outputs(upstream_grammar(params))
    if constraint is not None:
        body["structured_outputs"] = constraint
    return body


def upstream_grammar(params: SamplingParams) -> GrammarSpec | None:
    """The grammar the upstream can enforce: none while the model may think first (Pensieve's
    own engine pauses a grammar during thinking; an upstream would constrain the thinking
    text too), so such tool calls are parsed but not constrained."""
    return params.grammar if params.thinking_budget is None else None


def structured_outputs(grammar: GrammarSpec | None) -> dict[str, Any] | None:
    """A Pensieve grammar as vLLM's ``structured_outputs`` field (its xgrammar backend takes
    the same structural tags and EBNF Pensieve compiles itself)."""
    if grammar is None:
        return None
    if grammar.kind == "json_schema":
        return {"json": json.loads(grammar.payload)}
    if grammar.kind == "ebnf":
        return {"grammar": grammar.payload}
    return {"structural_tag": grammar.payload}


def _sglang_body(prompt_ids: list[int], params: SamplingParams,
                 stop_token_ids: frozenset[int]) -> dict[str, Any]:
    sampling: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if stop_token_ids and not params.ignore_eos:
        sampling["stop_token_ids"] = sorted(stop_token_ids)
    if params.seed is not None:
        sampling["sampling_seed"] = params.seed
    grammar = upstream_grammar(params)
    if grammar is not None:
        key = {"json_schema": "json_schema", "ebnf": "ebnf"}.get(grammar.kind, "structural_tag")
        sampling[key] = grammar.payload
    return {"input_ids": list(prompt_ids), "sampling_params": sampling, "stream": True}


@dataclass
class Chunk:
    """One streamed event, read: new token ids, and the end's reason and usage when it came."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # the upstream's word: "stop", "length", "abort"…
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None


class ChunkReader:
    """Reads a dialect's SSE ``data:`` payloads into ``Chunk``s (SGLang sends cumulative ids:
    the reader keeps how many it has passed on)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._seen = 0

    def read(self, data: str) -> Chunk | None:
        """One ``data:`` payload → a Chunk; None for ``[DONE]``."""
        if data.strip() == "[DONE]":
            return None
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise UpstreamProtocolError(f"not JSON in the upstream stream: {data[:200]!r}") from exc
        if not isinstance(event, dict):
            raise UpstreamProtocolError(f"unexpected upstream event: {data[:200]!r}")
        if "error" in event and not event.get("choices"):
            return Chunk(error=_error_text(event["error"]), finish_reason="error")
        return self._sglang(event) if self.dialect == "sglang" else _vllm(event)

    def _sglang(self, event: dict[str, Any]) -> Chunk:
        ids = event.get("output_ids") or []
        new, self._seen = list(ids[self._seen:]), max(self._seen, len(ids))
        meta = event.get("meta_info") or {}
        finish = meta.get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else finish
        return Chunk(new, _sglang_reason(reason), meta.get("prompt_tokens"), meta.get("cached_tokens"))


def _vllm(event: dict[str, Any]) -> Chunk:
    chunk = Chunk()
    for choice in event.get("choices") or ():
        ids = choice.get("token_ids")
        if ids is None and choice.get("text"):
            raise UpstreamProtocolError("the upstream streams text without token ids: it does not "
                                        "support return_token_ids (vLLM ≥ 0.10.2 does)")
        chunk.token_ids.extend(ids or ())
        chunk.finish_reason = choice.get("finish_reason") or chunk.finish_reason
    usage = event.get("usage")
    if isinstance(usage, dict):
        chunk.prompt_tokens = usage.get("prompt_tokens")
        details = usage.get("prompt_tokens_details") or {}
        chunk.cached_tokens = details.get("cached_tokens") if isinstance(details, dict) else None
    return chunk


def _sglang_reason(reason: object) -> str | None:
    if reason is None:
        return None
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(str(reason), str(reason))


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for other lines (comments, blank, ``event:``)."""
    if not line.startswith("data:"):
        return None
    return line[5:].lstrip(" ")
