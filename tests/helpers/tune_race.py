"""What the start-time tuners' race tests share: the warnings a tuner logs, collected, and the
Q6_K race cut to a few tiles a kernel family (the interpreter is slow; on a GPU, fewer
compiles) — the race itself is the same code whatever the candidates."""

from __future__ import annotations

import logging
from types import ModuleType

import pytest


def kept_warnings(log: logging.Logger) -> list[str]:
    """A list that collects the messages ``log`` emits at WARNING and above from now on."""
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    log.addHandler(Keep(level=logging.WARNING))
    return warnings


def few_q6k_tiles(tune: ModuleType) -> None:
    """``cuda_q6k_tune``'s gemv, skinny, gemm and dequant candidates cut to one tile a bucket
    (set on the module: for the interpreter checks, which run in a process of their own)."""
    from pensieve.backends import cuda_q6k

    tune.GEMV_CANDIDATES = (cuda_q6k.GEMV,)
    tune.SKINNY_CANDIDATES = {16: (cuda_q6k.SKINNY16,), 32: (cuda_q6k.SKINNY32,)}
    tune.GEMM_CANDIDATES = {16: (cuda_q6k.GEMM16,), 32: (cuda_q6k.GEMM16,),
                            256: (cuda_q6k.GEMM_SMALL,), 2048: (cuda_q6k.GEMM_SMALL,)}
    tune.DEQUANT_CANDIDATES = (cuda_q6k.DEQUANT,)


def first_q6k_tiles(monkeypatch: pytest.MonkeyPatch, tune: ModuleType) -> None:
    """``cuda_q6k_tune``'s gemv, split, skinny, gemm and dequant candidates cut to each
    bucket's first (a GPU race of one family's every tile among the others' first)."""
    monkeypatch.setattr(tune, "GEMV_CANDIDATES", tune.GEMV_CANDIDATES[:1])
    for name in ("SPLIT_CANDIDATES", "SKINNY_CANDIDATES", "GEMM_CANDIDATES"):
        monkeypatch.setattr(tune, name, {b: ts[:1] for b, ts in getattr(tune, name).items()})
    monkeypatch.setattr(tune, "DEQUANT_CANDIDATES", tune.DEQUANT_CANDIDATES[:1])
