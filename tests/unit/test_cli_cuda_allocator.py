"""A CUDA server asks torch's allocator for expandable segments unless the user configured the
allocator (either variable name). The setter's effect shows only on a GPU (the start log's
``GPU memory after the warm-up`` line); here: asked or not, and a torch without it tolerated."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends import cuda_allocator


@pytest.fixture
def asked(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.setattr(cuda_allocator, "_asked", False)
    return calls


def test_expandable_segments_by_default(asked):
    assert cuda_allocator.use_expandable_segments({})
    assert asked == ["expandable_segments:True"]
    assert cuda_allocator.describe() == "expandable segments"


@pytest.mark.parametrize("name", cuda_allocator.USER_ENV)
def test_a_users_allocator_settings_are_kept(asked, name):
    assert not cuda_allocator.use_expandable_segments({name: "max_split_size_mb:128"})
    assert asked == []
    assert cuda_allocator.describe() != "expandable segments"


def test_a_torch_that_refuses_is_logged_not_fatal(monkeypatch, caplog):
    def refuse(_: str) -> None:
        raise RuntimeError("no CUDA allocator here")

    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", refuse)
    monkeypatch.setattr(cuda_allocator, "_asked", False)
    assert not cuda_allocator.use_expandable_segments({})
    assert "could not ask" in caplog.text and "no CUDA allocator here" in caplog.text


def test_the_cuda_start_asks_before_loading():
    """The CUDA branch of the start calls it ahead of the weight kernels' choice and the load."""
    import inspect

    from pensieve.cli import serve_torch

    src = inspect.getsource(serve_torch.load_torch_engine)
    assert src.index("use_expandable_segments(os.environ)") < src.index("choose_weights(")


def test_pool_use_splits_the_allocators_pool_from_graph_pools():
    """The start log's by-pool line from a memory snapshot's segments: the default pool (id
    (0, 0)) and private (graph) pools summed apart, other devices' segments left out."""
    from pensieve.backends.cuda_allocator import pool_use

    gib = 2**30
    segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 4 * gib, "allocated_size": 3 * gib},
        {"device": 0, "segment_pool_id": (0, 0), "total_size": gib, "allocated_size": gib},
        {"device": 0, "segment_pool_id": (1, 0), "total_size": 2 * gib, "allocated_size": gib // 2},
        {"device": 1, "segment_pool_id": (0, 0), "total_size": 9 * gib, "allocated_size": 0},
    ]
    line = pool_use(segments, 0)
    assert "the allocator's pool 5.00 GiB reserved, 4.00 allocated (2 segments)" in line
    assert "private pools 2.00 GiB reserved, 0.50 allocated (1 segments)" in line
    assert pool_use([], 0) == "none"
    typed = pool_use([{"device": 0, "segment_pool_id": (0, 0), "segment_type": "small",
                       "total_size": gib, "allocated_size": gib // 4}], 0)
    assert typed == "the allocator's pool (small) 1.00 GiB reserved, 0.25 allocated (1 segments)"
