"""Synthetic requests through the step shapes that compile kernels on first use.

Triton compiles a kernel again for each new specialisation of its integer arguments (a row
count of 1, divisible by 16 or not) and the first use of a path costs more; on CUDA that is
~0.5 s a kernel, which a user's first requests (and a benchmark's first runs) would otherwise
pay: eager prefills of one or several prompts, prefill chunks over a cached prefix mixed with
decodes, short prompts joining decode graphs. The requests use fixed pseudo-random ids, run a
few tokens, and their cached blocks are forgotten afterwards.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from pensieve.engine.types import SamplingParams

if TYPE_CHECKING:
    from pensieve.engine.engine import Engine

# Waves of requests: (steps to run before adding it, prompt length, tokens shared with the
# wave's first prompt). A wave runs to completion before the next starts.
WAVES: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((0, 300, 0),),  # one eager prefill, rows not a multiple of 16
    ((0, 320, 0),),  # … a multiple of 16
    ((0, 17, 0), (0, 33, 0), (0, 300, 0)),  # several prompts in one eager step
    ((0, 40, 0), (1, 24, 0), (1, 16, 0), (2, 270, 0)),  # short prompts joining decodes, then a long one
    ((0, 40, 0), (0, 33, 0), (2, 260, 0), (2, 90, 0)),  # a long and a short prompt beside two decodes
    ((0, 300, 0), (2, 308, 288), (3, 319, 288), (4, 304, 288)),  # chunks over a cached prefix beside a decode
)
# A Claude Code follow-up turn: short chunks over a long cached prefix with nothing else in the
# step — alone (41 and 32 new tokens: not and a multiple of 16), then two at once. Lengths past
# LONG_PREFIX; the prefix is the wave's first prompt, finished (3 steps with its chunks) first.
LONG_PREFIX = 4096
LONG_WAVE: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (5, 41, 1), (9, 32, 1), (13, 100, 1), (13, 51, 1))


def _long_wave(cap: int, chunk: int) -> tuple[tuple[int, int, int], ...]:
    """``LONG_WAVE`` over a prefix of up to ``LONG_PREFIX`` tokens (a whole number of 16-token
    blocks that leaves room for the longest follow-up), its steps shifted by its chunks."""
    prefix = min(LONG_PREFIX, (cap - max(e for _, e, _ in LONG_WAVE)) // 16 * 16)
    if prefix < 256:
        return ()
    shift = -(-prefix // max(1, chunk)) - 1  # the prefix's extra prefill steps
    return tuple((s + (shift if s else 0), prefix + extra, prefix if shared else 0)
                 for s, extra, shared in LONG_WAVE)


def warm_up(engine: "Engine", max_tokens: int = 3) -> tuple[int, float]:
    """Run the waves (lengths capped by the context); returns (steps, seconds)."""
    started, steps = time.perf_counter(), 0
    rng = random.Random(0)
    vocab = engine.vocab_size
    cap = engine.context_length - max_tokens - 1
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    waves = WAVES + tuple(w for w in (_long_wave(cap, engine.config.max_num_batched_tokens),) if w)
    for w, wave in enumerate(waves):
        first: list[int] = []
        pending = list(wave)
        step_in_wave = 0
        while pending or engine.has_work():
            while pending and pending[0][0] <= step_in_wave:
                _, length, shared = pending.pop(0)
                length = max(1, min(length, cap))
                ids = first[:min(shared, length - 1)]
                ids += [rng.randrange(vocab) for _ in range(length - len(ids))]
                first = first or ids
                engine.add_request(f"warm-up-{w}-{len(pending)}-{step_in_wave}", ids, params)
            engine.step()
            steps += 1
            step_in_wave += 1
    engine.kv.forget_free()
    return steps, time.perf_counter() - started
