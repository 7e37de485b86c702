"""An autouse fixture for tests whose bounds are the CPU integer kernels': where AMX runs bf16
matmuls, layers built with the default take the bf16 path from 64 rows (its own bounds are
``test_cpu_quant_bf16_prefill``'s). Import ``integer_gemm`` into such a test module."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def integer_gemm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_BF16_PREFILL", "0")
