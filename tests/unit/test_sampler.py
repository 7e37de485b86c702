"""Sampler: greedy, top-k, top-p, seeds."""

from __future__ import annotations

import torch

from pensieve.engine.sampler import make_generator, sample
from pensieve.engine.types import SamplingParams


def draws(logits, params, n=300, seed=0):
    gen = make_generator(seed, "cpu")
    return [sample(logits.unsqueeze(0), [params], [gen])[0] for _ in range(n)]


def test_greedy_picks_argmax_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 4.9]])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]


def test_top_k_limits_support():
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7, 0.0])
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=2))) == {0, 1}


def test_top_p_limits_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7)))
    assert seen == {0, 1}


def test_temperature_sampling_explores_and_seed_repeats():
    logits = torch.zeros(10)
    a = draws(logits, SamplingParams(temperature=1.0), n=50, seed=3)
    b = draws(logits, SamplingParams(temperature=1.0), n=50, seed=3)
    assert a == b and len(set(a)) > 5


def test_batched_rows_keep_their_own_params():
    """Greedy, top-k and top-p rows sampled in one batch each keep their own support."""
    logits = torch.tensor([[2.0, 1.9, 1.8, 1.7, 0.0],
                           [0.0, 3.0, 1.0, 0.5, 0.2],
                           torch.log(torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])).tolist()])
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, top_p=0.7)]
    seen = [set(), set(), set()]
    for _ in range(300):
        for i, tok in enumerate(sample(logits, params, [None, None, None])):
            seen[i].add(tok)
    assert seen == [{0, 1}, {1}, {0, 1}]


def test_a_seeded_row_draws_the_same_whatever_it_is_batched_with():
    """Batch invariance: a seeded request's tokens depend on its seed and logits only."""
    torch.manual_seed(0)
    row = torch.randn(1000)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=200)
    alone = draws(row, params, n=40, seed=11)
    gen = make_generator(11, "cpu")
    others = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.5, top_k=3)]
    batched = []
    for step in range(40):
        batch = torch.stack([torch.randn(1000), row, torch.randn(1000), torch.randn(1000)])
        toks = sample(batch, [others[0], params, others[1], others[2]],
                      [make_generator(step, "cpu"), gen, None, None])
        batched.append(toks[1])
    assert batched == alone and len(set(alone)) > 5


def test_batched_draws_follow_the_distribution():
    """The exponential race draws as a multinomial would: frequencies near the softmax."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).repeat(8, 1)
    counts = torch.zeros(3)
    gen = make_generator(5, "cpu")
    for _ in range(250):
        for tok in sample(logits, [SamplingParams(temperature=1.0)] * 8, [gen] + [None] * 7):
            counts[tok] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_the_race_draws_are_exponential_and_never_zero(monkeypatch):
    """Exp(1) draws (mean 1, P(E > 1) = 1/e), all positive and finite — also where the uniform
    draw is its lowest value (a zero would make a masked token's p / E NaN, which argmax
    takes), and a seeded generator repeats its draws."""
    from pensieve.engine.sampler import _exponential

    e = _exponential(torch.empty(400_000))
    assert e.min() > 0 and torch.isfinite(e).all()
    assert abs(e.mean().item() - 1) < 0.01 and abs((e > 1).float().mean().item() - 0.3679) < 0.005
    lowest = torch.Tensor.uniform_
    monkeypatch.setattr(torch.Tensor, "uniform_",
                        lambda self, a, b, generator=None: self.fill_(a))  # every draw at its floor
    edge = _exponential(torch.empty(8))
    assert torch.isfinite(edge).all() and (edge > 0).all()
    monkeypatch.setattr(torch.Tensor, "uniform_", lowest)
    a = _exponential(torch.empty(16), torch.Generator().manual_seed(3))
    assert torch.equal(a, _exponential(torch.empty(16), torch.Generator().manual_seed(3)))


def test_the_log_space_race_keeps_masks_and_overflow():
    """Masked tokens (a grammar's -inf) are never drawn; a row whose logits overflow to +inf
    over its temperature draws its first largest (its argmax) rather than failing; draws with
    a top-k stay in it; a row masked but for one token draws that token."""
    params = [SamplingParams(temperature=1.0)]
    row = torch.randn(1, 50)
    row[0, ::2] = float("-inf")
    drawn = {int(sample(row, params, [make_generator(s, "cpu")])[0]) for s in range(200)}
    assert drawn and all(t % 2 == 1 for t in drawn) and len(drawn) > 5
    huge = torch.zeros(1, 50)
    huge[0, [7, 30]] = torch.finfo(torch.float32).max  # over a temperature of 0.5: +inf
    toks = sample(huge, [SamplingParams(temperature=0.5)], [None])
    assert int(toks[0]) == 7
    only = torch.full((1, 50), float("-inf"))
    only[0, 42] = 0.0
    assert all(int(sample(only, params, [None])[0]) == 42 for _ in range(20))
    k3 = torch.arange(50.0).unsqueeze(0)
    got = {int(sample(k3, [SamplingParams(temperature=5.0, top_k=3)], [None])[0])
           for _ in range(100)}
    assert got <= {47, 48, 49} and len(got) > 1


def test_the_windowed_nucleus_keeps_what_the_full_sort_keeps():
    """The top-p cut looked for among each row's best tokens (widened while short, sorted
    past a quarter of the vocabulary) keeps the tokens the full sort keeps: peaked and flat
    rows, top-k with it, whole rows, a masked vocabulary, batched with each other."""
    from pensieve.engine import sampler as S

    gen = torch.Generator().manual_seed(7)
    vocab = 8192
    for trial in range(60):
        rows = torch.randn(4, vocab, generator=gen) * (0.5 + trial % 5)
        rows[0, torch.randperm(vocab, generator=gen)[:30]] += 12  # a peaked row: a short nucleus
        if trial % 4 == 0:
            rows[:, ::3] = float("-inf")  # a grammar's mask
        top_k = [0, (0, 20, 300)[trial % 3], 0, 1000 if trial % 2 else 0]
        top_p = [(0.9, 0.95, 0.5)[trial % 3], 0.8, 2.0, (0.99, 0.3)[trial % 2]]
        got = ~torch.isinf(S._top_k_top_p(rows, top_k, top_p))
        want = ~torch.isinf(S._sorted_cut(rows, top_k, top_p))
        assert torch.equal(got, want), (trial, got.sum(1), want.sum(1))
    peaked = torch.randn(1, vocab, generator=gen)
    peaked[0, :5] += 20
    assert S._window_cut(peaked, [0], [0.95], 256) is not None  # found in the first window
    sort, want = S._sorted_cut, S._sorted_cut(peaked, [0], [0.95])
    try:  # a peaked row never reaches the full sort (a silent fallback would fail here)
        S._sorted_cut = None  # type: ignore[assignment]
        assert torch.equal(torch.isinf(S._top_k_top_p(peaked, [0], [0.95])), torch.isinf(want))
    finally:
        S._sorted_cut = sort
    flat = torch.zeros(1, vocab)
    assert S._window_cut(flat, [0], [0.95], 256) is None  # 95% of a flat row: sorted instead
    assert int((~torch.isinf(S._top_k_top_p(flat, [0], [0.95]))).sum()) == int(0.95 * vocab) + 1
