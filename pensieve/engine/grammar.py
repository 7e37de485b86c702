"""Grammar-constrained decoding over xgrammar: compile a ``GrammarSpec`` once, mask per token.

``GrammarCompiler`` belongs to one engine (one tokenizer, one logits width). It compiles on
a small pool of its own threads — the GIL is released while xgrammar works — never on the
engine's, and keeps compiled grammars in an LRU keyed by the spec: Claude Code sends the same
tools every turn, and its largest schemas take ~1 s each to compile. The engine holds a
constrained request back (``WAITING_FOR_GRAMMAR``) until ``GrammarConstraint.ready()``; the
other requests keep stepping meanwhile. A compile still running after ``timeout_s`` degrades
the request: to the spec's ``fallback`` (the tool-call structure without argument schemas),
else to no constraint, with a warning naming the grammar. The slow compile runs on and lands
in the cache for the next request with the same tools.

Each constrained request gets a ``GrammarConstraint`` (``grammar_constraint.py``): before sampling
it fills the matcher's next-token bitmask and adds -inf to the forbidden logits; after
sampling it advances the matcher. When the grammar is complete and only an end-of-turn
token could follow, ``done`` turns True and the engine finishes the request as EOS without
spending a forward pass on sampling that token.

xgrammar is optional, and imported on first use (it imports transformers and torch._dynamo:
~1.5 s of a server's start-up otherwise): without it unconstrained requests work and building
a constraint raises ``GrammarUnavailableError``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from pensieve.engine.bitmask import BitmaskApplier, token_bits as _token_bits
from pensieve.engine.errors import EngineError
from pensieve.engine.types import GrammarSpec

_NOT_IMPORTED: Any = object()
xgr: Any = _NOT_IMPORTED  # the xgrammar module once _xgrammar() ran; None when not installed

if TYPE_CHECKING:
    from pensieve.engine.grammar_constraint import GrammarConstraint
    from pensieve.loaders.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

# The one canonical JSON layout of constrained output: json.dumps' default separators.
JSON_SEPARATORS = (", ", ": ")


class GrammarUnavailableError(EngineError):
    def __init__(self) -> None:
        super().__init__(
            "constrained decoding (tool_choice any/tool, JSON output) needs the xgrammar "
            "package: pip install 'xgrammar>=0.2.8'"
        )


class GrammarError(ValueError):
    """xgrammar could not turn a schema or grammar into a grammar."""


def _xgrammar(server: bool = False) -> Any:
    """The xgrammar module (imported now if it was not yet), or None without it; ``server``:
    imported without transformers (``xgrammar_import.py``)."""
    global xgr
    if xgr is _NOT_IMPORTED:
        from pensieve.engine.xgrammar_import import import_xgrammar

        try:
            xgrammar = import_xgrammar(stand_in=server)
        except ImportError:  # optional: only constrained requests need it
            xgrammar = None
        xgr = xgrammar
    return xgr


def grammar_available(server: bool = False) -> bool:
    return _xgrammar(server) is not None


# xgrammar 0.2.8 writes the characters of a string with minLength/maxLength as [^"\\\r\n]:
# raw control characters allowed (invalid JSON), escapes forbidden (no newline or quote in
# such a string), and seconds of compile time for a 49k vocabulary. Those rules get JSON's
# string character instead (an escape counts as one character, as the schema means).
_BOUNDED_STRING_CHARACTER = r' ::= (([^\"\\\r\n]))'
_JSON_STRING_CHARACTER = r' ::= (([^\0-\x1f\"\\]) | ("\\" basic_escape))'


def json_schema_ebnf(schema: Mapping[str, Any] | bool) -> str:
    """The EBNF (root rule ``root``) of ``schema`` in the canonical layout; GrammarError if
    xgrammar cannot convert it. Needs no tokenizer: milliseconds, usable to vet schemas."""
    if _xgrammar() is None:
        raise GrammarUnavailableError()
    try:
        grammar = xgr.Grammar.from_json_schema(
            json.dumps(schema), any_whitespace=False, separators=JSON_SEPARATORS
        )
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the C++ message
        raise GrammarError(_last_line(exc)) from exc
    return _fix_bounded_strings(str(grammar))


def check_structural_tag(format_: Mapping[str, Any]) -> None:
    """GrammarError unless xgrammar builds a grammar from the structural-tag ``format_``.
    Needs no tokenizer: used to vet schemas for formats that are not JSON (Qwen XML)."""
    if _xgrammar() is None:
        raise GrammarUnavailableError()
    try:
        xgr.Grammar.from_structural_tag(json.dumps({"type": "structural_tag", "format": format_}))
    except Exception as exc:  # pydantic's ValidationError, or the C++ message
        raise GrammarError(_last_line(exc)) from exc


def _fix_bounded_strings(ebnf: str) -> str:
    if _BOUNDED_STRING_CHARACTER not in ebnf or "\nbasic_escape ::= " not in "\n" + ebnf:
        return ebnf
    lines = ebnf.splitlines()
    for i, line in enumerate(lines):
        if line.endswith(_BOUNDED_STRING_CHARACTER) and line.split(" ")[0].endswith("_characters"):
            lines[i] = line[: -len(_BOUNDED_STRING_CHARACTER)] + _JSON_STRING_CHARACTER
    return "\n".join(lines) + "\n"


def build_tokenizer_info(tokenizer: "TextTokenizer", vocab_size: int) -> Any:
    """xgrammar's view of the vocabulary: pieces as stored, how they encode bytes, stop ids.

    Equivalent to ``xgrammar.TokenizerInfo.from_huggingface`` on the same tokenizer, without
    importing transformers. ``vocab_size`` is the model's logits width (may exceed the vocab).
    """
    if _xgrammar() is None:
        raise GrammarUnavailableError()
    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for piece, idx in vocab.items():
        if idx < vocab_size:
            encoded[idx] = piece
    spec = json.loads(backend.to_str())
    return xgr.TokenizerInfo(
        encoded,
        _vocab_type(spec, vocab),
        vocab_size=vocab_size,
        stop_token_ids=sorted(tokenizer.eos_token_ids),
        add_prefix_space=_adds_prefix_space(spec),
    )


def _components(node: Any) -> list[dict[str, Any]]:
    """A tokenizer.json normalizer/pre-tokenizer/decoder, with Sequences flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        parts = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers") or []
        return [c for part in parts for c in _components(part)]
    return [node]


def _vocab_type(spec: dict[str, Any], vocab: Mapping[str, int]) -> Any:
    decoders = {c.get("type") for c in _components(spec.get("decoder"))}
    if "ByteLevel" in decoders:
        return xgr.VocabType.BYTE_LEVEL
    if "ByteFallback" in decoders or sum(f"<0x{b:02X}>" in vocab for b in range(256)) >= 128:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _adds_prefix_space(spec: dict[str, Any]) -> bool:
    for c in _components(spec.get("normalizer")):
        if c.get("type") == "Prepend" and c.get("prepend") == "▁":
            return True
    for c in _components(spec.get("pre_tokenizer")):
        if c.get("type") == "Metaspace":
            return c.get("prepend_scheme", "always") != "never" and c.get("add_prefix_space", True)
        if c.get("type") == "ByteLevel" and c.get("add_prefix_space"):
            return True
    return False


DEFAULT_COMPILE_WORKERS = 2
DEFAULT_COMPILE_TIMEOUT_S = 5.0


class GrammarCompiler:
    """Compiles specs for one tokenizer on a bounded pool of background threads (``workers``);
    caches the results (LRU). ``timeout_s`` is how long a request waits for its compile."""

    def __init__(self, tokenizer: "TextTokenizer", vocab_size: int, max_cached: int = 64, *,
                 workers: int = DEFAULT_COMPILE_WORKERS,
                 timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S) -> None:
        if _xgrammar() is None:
            raise GrammarUnavailableError()
        if workers < 1 or timeout_s <= 0:
            raise ValueError(f"grammar compiles need workers ≥ 1 and a positive timeout, "
                             f"got {workers} and {timeout_s:g} s")
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self._max_cached = max_cached
        self._cache: OrderedDict[GrammarSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pensieve-grammar")
        self._backend_lock = threading.Lock()
        self._xgr_compiler: Any = None  # built on a compile thread by the first job
        # when the vocabulary's matcher tables were ready: compile deadlines count from then, so
        # a large vocabulary's one-time build (~10 s for Gemma's 262k) degrades no request
        self.backend_ready_at: float | None = None
        self._backend_job: Future | None = None
        self.masks = BitmaskApplier(vocab_size)
        self._batch_bitmask: torch.Tensor | None = None
        self._batch_matcher: Any = None
        stops = frozenset(tokenizer.eos_token_ids)
        self.stop_bits = _token_bits(stops, vocab_size)
        self.non_stop_bits = _token_bits(frozenset(range(vocab_size)) - stops, vocab_size)
        # set from the tokenizer info by the first compile (see GrammarConstraint, closing)
        self.close_string_bits = self.close_bracket_bits = self.letter_bits = self.stop_bits

    def batch_bitmask(self, rows: int) -> torch.Tensor:
        """A scratch bitmask of at least ``rows`` rows for batch fills (engine thread only)."""
        if self._batch_bitmask is None or self._batch_bitmask.shape[0] < rows:
            self._batch_bitmask = xgr.allocate_token_bitmask(max(rows, 8), self.vocab_size)
        return self._batch_bitmask

    def batch_matcher(self) -> Any:
        """xgrammar's multi-threaded batch filler, made on first use."""
        if self._batch_matcher is None:
            self._batch_matcher = xgr.BatchGrammarMatcher()
        return self._batch_matcher

    def submit(self, spec: GrammarSpec) -> Future:
        """The compiled grammar of ``spec``, from the cache or compiling now in the background."""
        self.prepare()
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
            return future

    def prepare(self) -> Future:
        """Build the vocabulary's tables in the background, once, as a job of its own (a
        server calls this at start; the first compile otherwise)."""
        with self._lock:
            if self._backend_job is None:
                self._backend_job = self._pool.submit(self._backend)
            return self._backend_job

    def backend_failed(self) -> bool:
        job = self._backend_job
        return job is not None and job.done() and job.exception() is not None

    def compile(self, spec: GrammarSpec) -> Any:
        """Blocking ``submit``: the ``xgrammar.CompiledGrammar`` (GrammarError if it fails)."""
        return self.submit(spec).result()

    def constraint(self, spec: GrammarSpec, tokens_left: Callable[[], int] | None = None) -> "GrammarConstraint":
        """A matcher for ``spec``, its compile submitted now (``ready()`` says when it is done)."""
        from pensieve.engine.grammar_constraint import GrammarConstraint

        return GrammarConstraint(spec, self, tokens_left)

    def _set_closing_tokens(self, vocab: list[bytes]) -> None:
        # Gemma 4 writes tool-call strings between <|"|> tokens: one closes a string too
        pieces = [piece.replace(b'<|"|>', b'"') for piece in vocab]
        closers = [i for i, piece in enumerate(pieces) if piece and not piece.strip(b'"]}')]
        self.close_string_bits = _token_bits(frozenset(i for i in closers if pieces[i][:1] == b'"'), self.vocab_size)
        self.close_bracket_bits = _token_bits(frozenset(i for i in closers if pieces[i][:1] != b'"'), self.vocab_size)
        letters = {bytes([c]) for c in b"abcdfghijklmnopqrstuvwxyzABCDFGHIJKLMNOPQRSTUVWXYZ"}  # no e/E: numbers
        self.letter_bits = _token_bits(frozenset(i for i, piece in enumerate(vocab) if piece in letters), self.vocab_size)

    def _backend(self) -> Any:
        """xgrammar's compiler for this vocabulary (built by the first job, once)."""
        with self._backend_lock:
            if self._xgr_compiler is None:
                info = build_tokenizer_info(self._tokenizer, self.vocab_size)
                self._set_closing_tokens(info.decoded_vocab)
                threads = max(1, min(8, os.cpu_count() or 1))
                self._xgr_compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
                self.backend_ready_at = time.monotonic()
            return self._xgr_compiler

    def _compile(self, spec: GrammarSpec) -> Any:
        """Runs on a pool thread: ``spec`` → ``xgrammar.CompiledGrammar`` (GrammarError)."""
        comp = self._backend()
        t0 = time.perf_counter()
        try:
            if spec.kind == "structural_tag":
                out = comp.compile_structural_tag(spec.payload)
            elif spec.kind == "json_schema":
                out = comp.compile_grammar(json_schema_ebnf(json.loads(spec.payload)))
            else:
                out = comp.compile_grammar(spec.payload)
        except Exception as exc:
            raise GrammarError(f"{spec.label or spec.kind}: {_last_line(exc)}") from exc
        log.info("compiled grammar %s in %.0f ms", spec.label or spec.kind, (time.perf_counter() - t0) * 1e3)
        return out


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
