"""Grammar-constrained decoding: tokenizer info, bitmask application, the compile cache, and the
engine honouring a grammar (tiny model, real byte-level BPE tokenizer)."""

from __future__ import annotations

import json
import random

import pytest
import torch

xgr = pytest.importorskip("xgrammar")

from pensieve.engine import grammar as grammar_mod  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.backends.torch_backend import torch_engine  # noqa: E402
from pensieve.engine.engine import Engine  # noqa: E402
from pensieve.engine.grammar import (  # noqa: E402
    BitmaskApplier,
    GrammarCompiler,
    GrammarUnavailableError,
    _token_bits,
    build_tokenizer_info,
)
from pensieve.engine.types import FinishReason, GrammarSpec, SamplingParams  # noqa: E402
from pensieve.loaders.tokenizer import TextTokenizer  # noqa: E402
from pensieve.models.llama import LlamaForCausalLM  # noqa: E402
from tests.helpers.tiny_engine import tiny_args  # noqa: E402
from tests.unit.loader_fixtures import tiny_bpe_tokenizer  # noqa: E402
from tests.unit.test_loader_tokenizer import bpe_metadata, spm_metadata  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"command": {"type": "string"}, "timeout": {"type": "integer", "minimum": 0}},
    "required": ["command"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def bpe():
    return TextTokenizer.from_gguf_metadata(bpe_metadata(tiny_bpe_tokenizer()))


@pytest.fixture(scope="module")
def compiler(bpe):
    return GrammarCompiler(bpe, bpe.vocab_size)


def hf_info(tok: TextTokenizer):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tok.vocab_size,
                                              stop_token_ids=sorted(tok.eos_token_ids))


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_tokenizer_info_matches_xgrammars_huggingface_reading(kind, bpe):
    tok = bpe if kind == "bpe" else TextTokenizer.from_gguf_metadata(spm_metadata())
    ours, theirs = build_tokenizer_info(tok, tok.vocab_size), hf_info(tok)
    assert ours.vocab_type == theirs.vocab_type
    assert ours.vocab_type == (xgr.VocabType.BYTE_LEVEL if kind == "bpe" else xgr.VocabType.BYTE_FALLBACK)
    assert ours.add_prefix_space == theirs.add_prefix_space
    assert ours.decoded_vocab == theirs.decoded_vocab
    assert sorted(ours.stop_token_ids) == sorted(tok.eos_token_ids)


@pytest.mark.parametrize("vocab", [64, 100, 49152])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # numpy path, table path
def test_bitmask_applier_matches_xgrammar(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, words), dtype=torch.int32, generator=gen)
    logits = torch.randn(1, vocab, generator=gen, dtype=dtype)
    expected = logits.clone().float()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=vocab)
    BitmaskApplier(vocab).apply(logits[0], bitmask[0])
    assert torch.equal(logits.float(), expected)


def test_token_bits_sets_exactly_the_given_ids():
    bits = _token_bits(frozenset({0, 31, 32, 99}), 100)
    unpacked = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).view(-1)[:100]
    assert unpacked.nonzero().view(-1).tolist() == [0, 31, 32, 99]


def test_compiles_are_cached_by_spec(compiler):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA), label="first")
    again = GrammarSpec("json_schema", json.dumps(SCHEMA), label="another label")
    assert compiler.submit(spec) is compiler.submit(again)
    assert compiler.compile(spec) is compiler.compile(again)


def test_lru_keeps_the_newest(bpe):
    comp = GrammarCompiler(bpe, bpe.vocab_size, max_cached=2)
    specs = [GrammarSpec("ebnf", f'root ::= "{c}"') for c in "abc"]
    first = comp.submit(specs[0])
    for s in specs[1:]:
        comp.submit(s)
    assert comp.submit(specs[2]) is comp.submit(specs[2])
    assert comp.submit(specs[0]) is not first  # evicted, compiled again


def walk(constraint, tok: TextTokenizer, steps: int, seed: int = 0) -> tuple[str, bool]:
    """Sample from random logits under ``constraint``: the text, and whether it said done."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(steps):
        logits = torch.randn(tok.vocab_size, generator=gen) * 3
        constraint.apply(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if token in tok.eos_token_ids:
            return tok.decode(ids), False
        constraint.accept(token)
        ids.append(token)
        if constraint.done:
            return tok.decode(ids), True
    raise AssertionError(f"no end after {steps} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("seed", range(5))
def test_random_logits_under_a_schema_give_valid_json(compiler, bpe, seed):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA | {"properties": {
        "command": {"type": "string", "maxLength": 12},
        "timeout": {"type": "integer", "minimum": 0, "maximum": 999}}}))
    text, done = walk(compiler.constraint(spec), bpe, 200, seed)
    value = json.loads(text)
    assert set(value) <= {"command", "timeout"} and isinstance(value["command"], str)
    assert text == json.dumps(value, ensure_ascii=False)  # the canonical layout
    assert done  # a closed object admits nothing but the end of turn


def test_a_grammar_that_does_not_compile_leaves_the_request_unconstrained(compiler, bpe, caplog):
    constraint = compiler.constraint(GrammarSpec("ebnf", "root ::= undefined_rule"))
    logits = torch.zeros(bpe.vocab_size)
    constraint.apply(logits)
    constraint.accept(5)
    assert torch.equal(logits, torch.zeros(bpe.vocab_size)) and not constraint.done
    assert "did not compile" in caplog.text


def bpe_engine(tok: TextTokenizer, **overrides) -> Engine:
    """A tiny random llama over the tiny BPE vocabulary."""
    torch.manual_seed(0)
    args = tiny_args(vocab_size=tok.vocab_size)
    model = LlamaForCausalLM(args).eval()
    cfg = dict(context_length=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    cfg.update(overrides)
    return torch_engine(model, args, tok, EngineConfig(**cfg))


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    out = {rid: [] for rid in requests}
    final = {}
    while engine.has_work():
        for d in engine.step():
            out[d.request_id].extend(d.token_ids)
            if d.finish_reason is not None:
                final[d.request_id] = d
    return out, final


def test_engine_output_follows_the_grammar_and_ends_as_eos(bpe):
    spec = GrammarSpec("json_schema", json.dumps({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
        "additionalProperties": False}))
    prompt = bpe.encode("hello world")
    sampled = SamplingParams(max_tokens=60, temperature=1.0, seed=1, grammar=spec)
    plain = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine = bpe_engine(bpe)
    out, final = run(engine, {"g": (prompt, sampled), "p": (prompt, plain)})
    text = bpe.decode(out["g"])
    assert final["g"].finish_reason is FinishReason.EOS
    assert json.loads(text).keys() == {"n"} and text.startswith('{"n": ')
    assert not set(out["g"]) & bpe.eos_token_ids  # finished without sampling the EOS token
    alone, _ = run(bpe_engine(bpe), {"p": (prompt, plain)})
    assert alone["p"] == out["p"]  # the mask never leaks into another row of the batch
    assert not engine._processors


def test_without_xgrammar_only_constrained_requests_fail(bpe, monkeypatch):
    monkeypatch.setattr(grammar_mod, "xgr", None)
    engine = bpe_engine(bpe)
    with pytest.raises(GrammarUnavailableError, match="pip install"):
        engine.add_request("g", bpe.encode("hi"), SamplingParams(grammar=GrammarSpec("ebnf", 'root ::= "a"')))
    out, final = run(engine, {"p": (bpe.encode("hi"), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))})
    assert len(out["p"]) == 3 and final["p"].finish_reason is FinishReason.MAX_TOKENS


def test_grammar_spec_is_hashable_and_checked():
    a = GrammarSpec("ebnf", 'root ::= "a"', label="x")
    assert hash(a) == hash(GrammarSpec("ebnf", 'root ::= "a"')) and a == GrammarSpec("ebnf", 'root ::= "a"')
    with pytest.raises(ValueError):
        GrammarSpec("regex", "a+")  # type: ignore[arg-type]
    hash(SamplingParams(grammar=a))


def test_random_walks_stay_in_the_grammar_for_many_seeds(compiler, bpe):
    spec = GrammarSpec("ebnf", 'root ::= "[" item ("," item)* "]"\nitem ::= [0-9]+ | "\\"" [a-z]* "\\""')
    rng = random.Random(0)
    for _ in range(5):
        text, _ = walk(compiler.constraint(spec), bpe, 400, rng.randrange(1000))
        assert isinstance(json.loads(text), list)


def test_length_bounded_strings_stay_json_strings(compiler):
    """xgrammar 0.2.8 lets raw control characters into (and escapes out of) strings with
    minLength/maxLength; ``json_schema_ebnf`` rewrites those rules."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}
    matcher = xgr.GrammarMatcher(compiler.compile(GrammarSpec("json_schema", json.dumps(schema))))
    assert matcher.accept_string('{"s": "a\\nb\\""}') and matcher.is_completed()
    for bad in ('{"s": "a\tb', '{"s": "abcde'):
        matcher.reset()
        assert not matcher.accept_string(bad)


@pytest.mark.parametrize("max_tokens", [40, 64])
def test_a_call_about_to_hit_max_tokens_is_closed_while_still_valid(bpe, max_tokens):
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {"s": {"type": "string"}},
                                             "required": ["s"]}},
        "done": {"type": "boolean"}}, "required": ["items", "done"], "additionalProperties": False}
    spec = GrammarSpec("json_schema", json.dumps(schema))
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=3, grammar=spec)
    out, final = run(bpe_engine(bpe), {"g": (bpe.encode("hello"), params)})
    value = json.loads(bpe.decode(out["g"]))
    assert set(value) == {"items", "done"} and all(isinstance(i["s"], str) for i in value["items"])
    assert final["g"].finish_reason is FinishReason.EOS and len(out["g"]) <= max_tokens


def test_closing_never_cuts_free_text_short(compiler, bpe):
    """Outside a structure (an end of turn allowed) the closing reserve changes nothing."""
    spec = GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": ["<tool_call>"], "tags": [
            {"type": "tag", "begin": "<tool_call>", "content": {"type": "json_schema", "json_schema": {}},
             "end": "</tool_call>"}]}}))
    constraint = compiler.constraint(spec, tokens_left=lambda: 1)
    logits = torch.zeros(bpe.vocab_size)
    constraint.apply(logits)
    assert not torch.isinf(logits[bpe.encode("hello")]).any()


def test_closing_inside_a_string_closes_the_string_not_a_bracket(compiler, bpe):
    schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
    left = [100]
    constraint = compiler.constraint(GrammarSpec("json_schema", json.dumps(schema)), tokens_left=lambda: left[0])
    for token in bpe.encode('{"s": "abc'):
        constraint.apply(torch.zeros(bpe.vocab_size))  # budget 100: closing from 25 left
        constraint.accept(token)
    left[0] = 2
    logits = torch.zeros(bpe.vocab_size)
    logits[bpe.encode("]")[0]] = 10.0  # the model would write "]" inside the string
    constraint.apply(logits)
    assert bpe.decode([int(logits.argmax())]).startswith('"')


def test_closing_between_forced_calls_ends_the_turn(compiler, bpe):
    call = {"type": "tag", "begin": "<c>", "content": {"type": "json_schema", "json_schema": {"type": "integer"}},
            "end": "</c>"}
    spec = GrammarSpec("structural_tag", json.dumps({"type": "structural_tag", "format": {
        "type": "tags_with_separator", "tags": [call], "separator": "\n", "at_least_one": True}}))
    left = [100]
    constraint = compiler.constraint(spec, tokens_left=lambda: left[0])
    for token in bpe.encode("<c>1</c>"):
        constraint.apply(torch.zeros(bpe.vocab_size))
        constraint.accept(token)
    logits = torch.zeros(bpe.vocab_size)
    logits[bpe.encode("\n")[0]] = 10.0  # the model would start another call
    early = logits.clone()
    constraint.apply(early)
    assert int(early.argmax()) == bpe.encode("\n")[0]  # early in the budget: another call may follow
    left[0] = 3
    constraint.apply(logits)
    assert int(logits.argmax()) in bpe.eos_token_ids


def test_masks_filled_together_equal_masks_filled_one_by_one(compiler, bpe):
    """A step's rows filled in one xgrammar batch call mask exactly as each row's own fill:
    three pairs of constraints (two schemas and free text with a trigger) walked in lockstep,
    one of each pair filled alone, the other in a batch."""
    from pensieve.engine.sampler import apply_rows

    specs = [GrammarSpec("json_schema", json.dumps(SCHEMA)),
             GrammarSpec("ebnf", 'root ::= "ab" [a-z]* "."'),
             GrammarSpec("json_schema", json.dumps({"type": "array", "items": {"type": "integer"}}))]
    alone = [compiler.constraint(s) for s in specs]
    together = [compiler.constraint(s) for s in specs]
    for c in alone + together:
        c._compiled.result(timeout=60)
    gen = torch.Generator().manual_seed(0)
    live = list(range(len(specs)))
    for _ in range(40):
        base = torch.randn(len(specs), bpe.vocab_size, generator=gen) * 3
        one = base.clone()
        for i in live:
            alone[i].apply(one[i])
        batch = base.clone()
        assert apply_rows(batch, [[together[i]] if i in live else None for i in range(len(specs))]) == {}
        assert torch.equal(torch.isinf(one), torch.isinf(batch))
        for i in list(live):
            token = int(one[i].argmax())
            if token in bpe.eos_token_ids:
                live.remove(i)
                continue
            alone[i].accept(token)
            together[i].accept(token)
            if alone[i].done:
                assert together[i].done
                live.remove(i)
        if not live:
            break
    assert compiler._batch_matcher is not None  # the batch path ran
