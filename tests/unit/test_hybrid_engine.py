"""Hybrid cache layouts through the real engine: a tiny model with recurrent, full, windowed and
latent layers gives the same greedy tokens whole, chunked, resumed from a state checkpoint and
after preemption; the fast paths stay off; Gemma 3's windowed layers give their blocks back
while the engine's tokens still equal transformers' ``generate``."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from pensieve.backends.torch_backend import build_model, torch_engine
from pensieve.engine.config import EngineConfig
from pensieve.engine.kv_groups import GroupedKVManager
from pensieve.engine.kv_plan import window_resume_interval
from pensieve.engine.types import SamplingParams
from pensieve.models.family import FastPaths
from tests.helpers.tiny_engine import ByteTokenizer
from tests.helpers.tiny_recurrent import WINDOW, tiny_recurrent_engine

TOK = ByteTokenizer()
PREFIX = "You are a careful assistant. Tools: Bash, Read, Edit. " * 2
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def generate(engine, prompts: dict[str, list[int]], params=GREEDY) -> dict[str, tuple[list[int], object]]:  # noqa: ANN001
    """Run the prompts together; each request's tokens and last delta."""
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    out: dict[str, list] = {rid: [[], None] for rid in prompts}
    while engine.has_work():
        for d in engine.step():
            out[d.request_id][0].extend(d.token_ids)
            out[d.request_id][1] = d
    return {rid: (toks, last) for rid, (toks, last) in out.items()}


def one(engine, rid: str, text: str, params=GREEDY):  # noqa: ANN001, ANN201
    return generate(engine, {rid: TOK.encode(text)}, params)[rid]


def all_free(engine) -> bool:  # noqa: ANN001
    kv = engine.kv
    return all(p.num_free == p.num_blocks for p in kv.pools) and (
        kv.states is None or (kv.states.num_free_slots == kv.states.num_slots
                              and kv.states.pool.num_free == kv.states.pool.num_blocks))


@cache
def whole_run(text: str) -> list[int]:
    engine = tiny_recurrent_engine(max_num_batched_tokens=256, enable_prefix_cache=False)
    return one(engine, "whole", text)[0]


def test_chunked_prefill_equals_one_go():
    text = PREFIX + "Question two?"
    engine = tiny_recurrent_engine(max_num_batched_tokens=8)
    assert isinstance(engine.kv, GroupedKVManager)
    assert one(engine, "r", text)[0] == whole_run(text)
    assert all_free(engine)


def test_follow_up_resumes_from_a_checkpoint_and_matches_cold():
    engine = tiny_recurrent_engine(max_num_batched_tokens=16)  # a chunk, a checkpoint: every 16
    one(engine, "t1", PREFIX + "Question one?")
    tokens, last = one(engine, "t2", PREFIX + "Question two?")
    assert tokens == whole_run(PREFIX + "Question two?")
    shared = len(TOK.encode(PREFIX + "Question "))
    # the recurrent layers keep a state every 16, the windowed layer its window every 32
    every = window_resume_interval(WINDOW, engine.config.state_checkpoint_interval)
    assert every == 32 and last.num_cached_tokens == shared // every * every > 0
    assert all_free(engine) and engine.kv.states.num_cached > 0


def test_same_prompt_again_resumes_from_its_last_full_block():
    engine = tiny_recurrent_engine()
    text = PREFIX + "Same."
    first, _ = one(engine, "a", text)
    again, last = one(engine, "b", text)
    n = len(TOK.encode(text))
    assert again == first and last.num_cached_tokens == (n - 1) // 4 * 4 == n // 4 * 4 - (0 if n % 4 else 4)


def test_preempted_requests_recompute_to_the_same_tokens():
    # 3 prompts of ~110 tokens and 12 outputs each on 40 blocks of 4: somebody is preempted
    texts = {f"r{i}": TOK.encode(PREFIX + f"Question {i}?") for i in range(3)}
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = tiny_recurrent_engine(num_kv_blocks=40, context_length=160, max_num_batched_tokens=32)
    together = generate(engine, texts, params)
    for rid, ids in texts.items():
        alone = tiny_recurrent_engine(max_num_batched_tokens=256, enable_prefix_cache=False)
        assert together[rid][0] == generate(alone, {rid: ids}, params)[rid][0]
    assert all_free(engine)


def test_fast_paths_stay_off_for_a_hybrid_layout():
    engine = tiny_recurrent_engine()
    runner = engine.runner
    assert runner.fast == FastPaths()  # the model declared them; its layout is not uniform
    assert runner.cpu_decoder is None and runner.cpu_attention is None and runner.graphs is None
    assert not runner.can_carry([])


# ---- Gemma 3: sliding windows freed, exact against transformers --------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):  # noqa: ANN201
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import VOCAB, hf_model, save_hf

    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=8, query_pre_attn_scalar=24)
    ref = hf_model(config)
    ckpt = load_checkpoint(save_hf(tmp_path_factory.mktemp("gemma3") / "hf", ref))
    return ref, ckpt, VOCAB


def test_gemma3_windows_give_blocks_back_and_tokens_equal_generate(gemma):
    ref, ckpt, vocab = gemma
    config = EngineConfig(context_length=128, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    engine = torch_engine(build_model(ckpt, config), ckpt.args, ckpt.tokenizer, config)
    kv = engine.kv
    assert isinstance(kv, GroupedKVManager) and [g.kind for g in kv.groups] == ["full", "window"]
    ids = torch.randint(3, vocab, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    steps = 10
    engine.add_request("r", ids, SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    most = [0, 0]
    while engine.has_work():
        for d in engine.step():
            tokens.extend(d.token_ids)
        most = [max(m, p.num_blocks - p.num_free) for m, p in zip(most, kv.pools)]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert tokens == expected
    assert most[0] == -(-(len(ids) + steps - 1) // 4)  # full attention keeps every block
    assert most[1] <= 8 // 4 + 16 // 4 + 1  # the window + one chunk



def test_gemma3_inside_its_window_takes_the_compiled_attention_per_group(gemma, tmp_path):
    """Contexts within the shortest window: the compiled CPU attention serves both groups (a
    step each, over its own tables), as it served the one table; tokens still equal generate."""
    from pensieve.backends.cpu_quant import load_kernels
    from pensieve.backends.hybrid_cache import GroupedAttention

    if load_kernels() is None:
        pytest.skip("CPU kernels cannot build here")
    ref, ckpt, vocab = gemma
    config = EngineConfig(context_length=128, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    engine = torch_engine(build_model(ckpt, config), ckpt.args, ckpt.tokenizer, config)
    runner = engine.runner
    assert runner.cpu_attention is not None
    seen = []
    original = runner._hybrid_attention

    def spy(*a):  # noqa: ANN002, ANN202
        backend = original(*a)
        seen.append(type(backend).__name__)
        return backend

    runner._hybrid_attention = spy
    ids = torch.randint(3, vocab, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    engine.add_request("r", ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    tokens = []
    while engine.has_work():
        for d in engine.step():
            tokens.extend(d.token_ids)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert tokens == expected
    assert GroupedAttention.__name__ in seen and "NoneType" in seen  # inside, then past the window
