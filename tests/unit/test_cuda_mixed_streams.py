"""``CudaMixedLinear``'s parts as parallel branches of a captured CUDA graph (a Q4_K_M layer's
Q4_K q/k beside its Q6_K v): on where the parts' widths differ, off by switch; the captured
graph replays bit for bit as the parts run one after the other eagerly, at decode and chunk
row counts, repeated in one graph (a layer after a layer: the side stream reused)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from pensieve.backends.cuda_int8 import ENV_MIXED_STREAMS, CudaMixedLinear, cuda_codes_linear
from tests.helpers.cuda_graph_check import assert_replays_as_eager
from tests.unit.test_cuda_int8 import groups, rel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
K = 512


def _qkv():
    return cuda_codes_linear([groups(Q.Q4_K, 64, K, 1), groups(Q.Q4_K, 16, K, 2),
                              groups(Q.Q6_K, 16, K, 3)], torch.randn(96))


def test_concurrent_only_where_widths_differ_and_not_switched_off(monkeypatch):
    mixed = _qkv()
    assert isinstance(mixed, CudaMixedLinear) and mixed.concurrent  # 80 (q, k) beside 16 (v)
    same = cuda_codes_linear([groups(Q.Q4_K, 16, K, 1), groups(Q.Q6_K, 16, K, 3)])
    assert isinstance(same, CudaMixedLinear) and not same.concurrent
    monkeypatch.setenv(ENV_MIXED_STREAMS, "0")
    assert not _qkv().concurrent
    x = torch.randn(3, K)  # on the CPU (no capture): the parts in turn, as ever
    w = torch.cat([p.dequantize() for p in (groups(Q.Q4_K, 64, K, 1), groups(Q.Q4_K, 16, K, 2),
                                             groups(Q.Q6_K, 16, K, 3))])
    assert rel(mixed(x), x.double() @ w.T.double() + mixed.bias.double()) < 1e-3


@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_parallel_branches_replay_as_eager(rows):
    a, b = (_qkv().to(device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert a.concurrent
    x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    # two layers in one graph, the second reading the first's output padded back to K columns
    assert_replays_as_eager(lambda t: b(torch.nn.functional.pad(a(t), (0, K - 96))), x)
