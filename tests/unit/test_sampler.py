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
