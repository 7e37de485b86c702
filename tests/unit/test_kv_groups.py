"""The grouped KV manager's policies without a model: window freeing and what stays findable,
prefix hits as the minimum over groups, recurrent-state checkpoints (boundaries, store,
restore, LRU eviction with the retained tier), preemption and block accounting, sizing."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.hybrid_cache import HybridCaches, group_block_bytes, plan_cache, state_bytes
from pensieve.engine.config import EngineConfig
from pensieve.engine.kv_groups import NULL_BLOCK, GroupedKVManager, kv_manager_for
from pensieve.engine.kv_manager import KVCacheManager
from pensieve.engine.kv_plan import (
    FULL, RECURRENT, WINDOW, CachePlan, GroupPlan, group_layers, window_resume_interval,
)
from pensieve.engine.request import Request
from pensieve.engine.types import SamplingParams
from pensieve.models.cache_spec import PagedKV, RecurrentState

BS, W, INTERVAL = 4, 4, 16  # a window of one block: its resume points are the interval


def plan(*kinds: str, blocks: int = 64, checkpoints: int = 8) -> CachePlan:
    groups = []
    for i, kind in enumerate(kinds):
        groups.append(GroupPlan(kind, (i,), W if kind == WINDOW else None,
                                0 if kind == RECURRENT else blocks))
    rec = RECURRENT in kinds
    return CachePlan(tuple(groups), BS, 4 if rec else 0, checkpoints if rec else 0, INTERVAL)


def request(ids: list[int], rid: str = "r", retain: bool = False) -> Request:
    return Request(rid, list(ids), SamplingParams(max_tokens=4, retain_prefix=retain), None, None)  # type: ignore[arg-type]


def run(kv: GroupedKVManager, req: Request, budget: int = 64, upto: int | None = None) -> list[int]:
    """Admit ``req`` and prefill it (chunks as the scheduler cuts them); the chunk sizes."""
    kv.match_prefix(req)
    sizes = []
    while req.num_computed_tokens < (upto or len(req.prompt_ids)):
        n = kv.chunk_tokens(req, min(budget, (upto or len(req.prompt_ids)) - req.num_computed_tokens))
        assert kv.reserve(req, n)
        req.num_computed_tokens += n
        kv.commit(req)
        sizes.append(n)
    return sizes


def held(pool) -> int:  # noqa: ANN001
    return pool.num_blocks - pool.num_free


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_window_blocks_leave_while_the_request_runs_and_the_full_ones_stay():
    kv = GroupedKVManager(plan(FULL, WINDOW))
    req = request(ids(60))
    kv.match_prefix(req)
    most = 0
    while req.num_computed_tokens < 60:
        assert kv.reserve(req, 4)
        req.num_computed_tokens += 4
        kv.commit(req)
        most = max(most, held(kv.pools[1]))
    assert held(kv.pools[0]) == 15  # every block of full attention
    assert most <= -(-W // BS) + 1  # the window and the block being written
    table = req.cache.tables[1]
    assert table[: len(table) - 3].count(NULL_BLOCK) == len(table) - 3
    kv.free(req)
    assert held(kv.pools[0]) == held(kv.pools[1]) == 0


def test_a_hit_lands_on_a_resume_point_whose_window_was_kept():
    kv = GroupedKVManager(plan(FULL, WINDOW))
    first = ids(40)
    run(kv, a := request(first))
    kv.free(a)
    same = request(first + ids(10, seed=1), "b")  # shares all 40: the prompt's end was kept
    assert kv.match_prefix(same) == 40
    assert same.cache.tables[1][:9] == [NULL_BLOCK] * 9 and NULL_BLOCK not in same.cache.tables[1][9:]
    kv.free(same)
    # diverging at 30: the full layers have 28 tokens, but the window before 28 was not kept
    # (no resume point there); 16, a multiple of the interval, was
    other = request(first[:30] + ids(20, seed=2), "c")
    assert kv.match_prefix(other) == 16
    assert len(other.cache.tables[0]) == 4 and other.cache.tables[1][:3] == [NULL_BLOCK] * 3


def test_window_only_layout_frees_and_hits():
    kv = GroupedKVManager(plan(WINDOW))
    first = ids(40)
    run(kv, a := request(first))
    assert held(kv.pools[0]) <= 4
    kv.free(a)
    assert kv.match_prefix(request(first + [1, 2, 3])) == 40


def test_recurrent_chunks_end_on_checkpoints_and_a_follow_up_resumes_from_the_last_one():
    kv = GroupedKVManager(plan(FULL, RECURRENT))
    first = ids(45)
    a = request(first)
    assert run(kv, a, budget=16) == [16, 16, 12, 1]  # interval multiples, the prompt's last block
    assert kv.states.num_cached == 3  # 16, 32, 44
    kv.free(a)
    assert kv.states.num_free_slots == 4
    b = request(first[:40] + ids(8, seed=3), "b")
    assert kv.match_prefix(b) == 32  # the full layers have 40 tokens; the state is kept at 32
    assert b.cache.restore is not None
    checkpoint = b.cache.restore
    assert kv.states.pool.ref_count(checkpoint) == 1  # held until the runner restored it
    run(kv, b)
    assert kv.states.pool.ref_count(checkpoint) == 0 and b.cache.restore is None


def test_a_long_chunk_ends_on_its_last_boundary_only():
    kv = GroupedKVManager(plan(FULL, RECURRENT))
    a = request(ids(99))
    assert run(kv, a, budget=40) == [32, 32, 32, 3]  # 96 is the prompt's last full block
    assert kv.states.num_cached == 3


def test_no_checkpoint_no_hit_even_with_every_block_cached():
    kv = GroupedKVManager(plan(FULL, RECURRENT, checkpoints=0))
    first = ids(40)
    run(kv, a := request(first))
    kv.free(a)
    assert kv.match_prefix(request(first + [7, 7])) == 0


def test_checkpoints_evict_lru_and_a_session_keeps_its_own():
    kv = GroupedKVManager(plan(FULL, RECURRENT, checkpoints=4))
    session = ids(20)  # checkpoints at 16 and 20
    run(kv, a := request(session, "a", retain=True))
    kv.free(a)
    for i in range(3):  # side requests: 16 and 20 each, evicting each other, not the session's
        run(kv, side := request(ids(20, seed=10 + i), f"s{i}"))
        kv.free(side)
    assert kv.match_prefix(request(session + [5, 5, 5], "c")) == 20


def test_preemption_mid_prefill_gives_everything_back():
    kv = GroupedKVManager(plan(FULL, WINDOW, RECURRENT))
    req = request(ids(50))
    run(kv, req, budget=16, upto=30)
    assert kv.reserve(req, 2) and req.cache.save is not None  # a chunk ending on 32, in flight
    kv.free(req)
    assert [held(p) for p in kv.pools] == [0, 0] and kv.states.num_free_slots == 4
    assert kv.states.pool.num_free == kv.states.pool.num_blocks
    req.num_computed_tokens = 0  # what the scheduler does; the request comes back
    assert kv.match_prefix(req) == 16  # from its own checkpoint


def test_reserve_is_all_or_nothing_across_groups():
    kv = GroupedKVManager(CachePlan((GroupPlan(FULL, (0,), None, 64), GroupPlan(WINDOW, (1,), W, 3)),
                                    BS, checkpoint_interval=INTERVAL))
    req = request(ids(30))
    kv.match_prefix(req)
    assert not kv.reserve(req, 16)  # the window group has 3 blocks, a chunk of 16 needs 4
    assert held(kv.pools[0]) == 0 and req.cache.tables[0] == []
    assert kv.reserve(req, 12)


def test_windows_keep_at_most_about_a_quarter_for_hits():
    assert window_resume_interval(128, 512) == 512  # gpt-oss: 128 of every 512
    assert window_resume_interval(1024, 512) == 4096  # Gemma 3: 1024 of every 4096
    assert window_resume_interval(4, 16) == 16 and window_resume_interval(8, 16) == 32
    assert window_resume_interval(1024, 0) == 0  # the prompt's end only


def test_layers_group_by_policy_and_wide_windows_are_full():
    layout = (RecurrentState((3, 8), (4, 4)), PagedKV(2, 8, 8, 4), PagedKV(2, 8, 8),
              PagedKV(1, 12, 0), PagedKV(2, 8, 8, 4096), PagedKV(2, 8, 8, 4))
    assert group_layers(layout, 1024) == [
        (FULL, None, (2, 3, 4)), (WINDOW, 4, (1, 5)), (RECURRENT, None, (0,))]
    single = kv_manager_for(CachePlan((GroupPlan(FULL, (0, 1), None, 8),), BS), 8, BS, True)
    assert isinstance(single, KVCacheManager)


def test_sizing_counts_every_layer_latent_k_only_and_states():
    layout = (RecurrentState((3, 8), (4, 4)), PagedKV(2, 8, 8), PagedKV(1, 12, 0), PagedKV(2, 8, 8, 16))
    config = EngineConfig(context_length=256, block_size=BS, max_num_seqs=2, max_num_batched_tokens=32,
                          state_checkpoint_interval=64, state_checkpoints=5)
    assert group_block_bytes(layout, (1, 2), BS, torch.float32) == (2 * 16 + 12) * BS * 4
    assert state_bytes(layout) == (24 + 16) * 4
    p = plan_cache(layout, config, budget=1 << 20)
    assert [g.kind for g in p.groups] == [FULL, WINDOW, RECURRENT]
    assert p.paged[0].num_blocks == 64 * 2  # every seat's full context fits the budget
    assert p.paged[1].num_blocks < p.paged[0].num_blocks  # the window group needs fewer
    assert (p.state_slots, p.checkpoints, p.checkpoint_interval) == (2, 5, 64)
    small = plan_cache(layout, config, budget=20_000)
    assert small.paged[0].num_blocks == 64  # one full context at least
    caches = HybridCaches(layout, p, config, torch.device("cpu"))
    # past the pool: the null block, then the static decode step's scratch block
    assert caches.k_caches[2].shape == (p.paged[0].num_blocks + 2, BS, 1, 12)
    assert caches.v_caches[2].numel() == 0  # latent: K only
    # a state slot a seat, then the static decode step's scratch slot
    assert caches.k_caches[0].numel() == 0 and caches.conv[0].shape == (3, 3, 8)
    assert caches.scratch_slot == 2
    assert caches.saved_ssm[0].shape == (5, 4, 4)
    null = caches.null_blocks[1]
    assert null == p.paged[1].num_blocks and caches.scratch_blocks[1] == null + 1
    assert caches.k_caches[3][null].abs().sum() == 0  # the window group's null block reads zeros


def test_interval_must_be_block_aligned():
    with pytest.raises(ValueError, match="multiple of block_size"):
        EngineConfig(block_size=16, state_checkpoint_interval=100)


@pytest.mark.parametrize("retain", [True, False])
def test_a_sessions_kept_windows_outlive_side_requests(retain):
    """A small window pool: side requests reuse the blocks they free and the ones a window
    dropped, not the windows a session (``retain_prefix``) kept for its next turn."""
    kv = GroupedKVManager(CachePlan((GroupPlan(FULL, (0,), None, 64), GroupPlan(WINDOW, (1,), W, 12)),
                                    BS, checkpoint_interval=INTERVAL))
    session = ids(40)
    run(kv, a := request(session, "a", retain=retain), budget=4)
    kv.free(a)
    for i in range(4):
        run(kv, side := request(ids(40, seed=20 + i), f"s{i}"), budget=4)
        kv.free(side)
    hit = kv.match_prefix(request(session + [9, 9], "c"))
    assert hit == 40 if retain else hit < 40


def test_a_layout_of_recurrent_layers_only_is_refused_with_a_clear_error():
    layout = (RecurrentState((3, 8), (4, 4)),) * 2
    config = EngineConfig(context_length=256, block_size=BS, max_num_seqs=2, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="at least one attention layer"):
        plan_cache(layout, config, budget=1 << 20)
