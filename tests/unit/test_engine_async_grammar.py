"""Async scheduling stays on with logits processors (grammars, the loop guard): the previous
step's tokens are read and fed to the processors while the next forward runs, and the masks
are applied before sampling — the same tokens as synchronous steps, on steps that ran on ids
the host had not read yet."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("xgrammar")

from pensieve.engine.grammar import GrammarCompiler  # noqa: E402
from pensieve.engine.types import DryParams, FinishReason, GrammarSpec, SamplingParams  # noqa: E402
from pensieve.loaders.tokenizer import TextTokenizer  # noqa: E402
from tests.unit.loader_fixtures import tiny_bpe_tokenizer  # noqa: E402
from tests.unit.test_grammar import bpe_engine, run  # noqa: E402
from tests.unit.test_loader_tokenizer import bpe_metadata  # noqa: E402

OBJECT = GrammarSpec("json_schema", json.dumps({
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "s": {"type": "string", "maxLength": 8}},
    "required": ["n", "s"], "additionalProperties": False}))
ARRAY = GrammarSpec("json_schema", json.dumps({"type": "array", "items": {"type": "integer"}, "maxItems": 4}))


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.from_gguf_metadata(bpe_metadata(tiny_bpe_tokenizer()))


def requests(tok):
    return {
        "g1": (tok.encode("hello world"), SamplingParams(max_tokens=60, temperature=1.0, seed=1, grammar=OBJECT)),
        "g2": (tok.encode("another prompt"), SamplingParams(max_tokens=40, temperature=0.0, grammar=ARRAY)),
        "g3": (tok.encode("hello there world"), SamplingParams(max_tokens=12, temperature=0.7, seed=9, grammar=OBJECT)),
        "d": (tok.encode("loop guard"), SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True,
                                                       dry=DryParams())),
        "p": (tok.encode("plain"), SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True)),
    }


def count_constrained_carried(engine) -> list[int]:
    """Steps that ran on carried ids with a constrained request among them."""
    calls = [0]
    run_model = engine.runner.run

    def spy(chunks, carried=None, carried_rows=()):
        constrained = any(c.request.params.grammar is not None for c in chunks)
        calls[0] += carried is not None and constrained
        return run_model(chunks, carried, carried_rows)

    engine.runner.run = spy
    return calls


def test_async_with_grammars_gives_the_sync_tokens_and_chains_steps(bpe):
    sync, overlapped = bpe_engine(bpe, async_scheduling=False), bpe_engine(bpe, async_scheduling=True)
    for engine in (sync, overlapped):  # compiled first: both admit every request at once
        engine._processor_source.compiler = GrammarCompiler(bpe, engine.vocab_size)
        for spec in (OBJECT, ARRAY):
            engine.grammars.compile(spec)
    carried = count_constrained_carried(overlapped)
    a, fa = run(sync, requests(bpe))
    b, fb = run(overlapped, requests(bpe))
    assert a == b
    assert {k: f.finish_reason for k, f in fa.items()} == {k: f.finish_reason for k, f in fb.items()}
    assert fb["g1"].finish_reason is FinishReason.EOS and json.loads(bpe.decode(b["g1"])).keys() == {"n", "s"}
    assert carried[0] >= 5  # constrained decode steps launched before the host read the last ids
    assert overlapped.pool.num_free == overlapped.pool.num_blocks and not overlapped.has_work()


def test_a_processor_that_raises_under_async_fails_only_its_request(bpe, monkeypatch):
    from pensieve.engine.repetition import DryProcessor

    engine = bpe_engine(bpe, async_scheduling=True)
    calls = [0]
    original = DryProcessor.apply

    def flaky(self, logits):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("mask broke")
        return original(self, logits)

    monkeypatch.setattr(DryProcessor, "apply", flaky)
    out, final = run(engine, {k: v for k, v in requests(bpe).items() if k in ("d", "p")})
    assert final["d"].finish_reason is FinishReason.ERROR and "mask broke" in final["d"].error
    assert final["p"].finish_reason is FinishReason.MAX_TOKENS and len(out["p"]) == 30
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_async_with_grammars_gives_the_sync_tokens(bpe):
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.models.llama import LlamaForCausalLM
    from tests.helpers.tiny_engine import tiny_args

    def engine(overlap: bool):
        torch.manual_seed(0)
        args = tiny_args(vocab_size=bpe.vocab_size)
        model = LlamaForCausalLM(args).eval().to("cuda")
        config = EngineConfig(context_length=512, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                              device="cuda", async_scheduling=overlap)
        built = torch_engine(model, args, bpe, config)
        built._processor_source.compiler = GrammarCompiler(bpe, built.vocab_size)
        for spec in (OBJECT, ARRAY):
            built.grammars.compile(spec)
        return built

    sync, overlapped = engine(False), engine(True)
    carried = count_constrained_carried(overlapped)
    a, fa = run(sync, requests(bpe))
    b, fb = run(overlapped, requests(bpe))
    assert a == b
    assert {k: f.finish_reason for k, f in fa.items()} == {k: f.finish_reason for k, f in fb.items()}
    assert carried[0] >= 5
