"""``backends/weights_pool.compact`` on the CPU (the CUDA pool context is the one difference on a
GPU: here a context that records what was allocated inside it): every storage the model's
tensors use is copied once, every tensor object on it — tied parameters, views kept in other
attributes, tensors in a dataclass — points at the copy with the same values, nothing else is
touched, and no live tensor still points at an old storage."""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch
from torch import nn

from pensieve.backends import weights_pool


@dataclass(frozen=True)
class Held:
    w: torch.Tensor
    note: str


class Block(nn.Module):
    def __init__(self, shared: nn.Parameter) -> None:
        super().__init__()
        self.shared = shared  # tied with the other block's
        self.register_buffer("codes", torch.arange(64, dtype=torch.uint8).view(8, 8))
        self.register_buffer("absent", None)
        self.rows = self.codes[2:5]  # a view kept as a plain attribute
        self.held = Held(torch.randn(3, 5), "dataclass")
        self.pair = (torch.randn(4), torch.randn(2, 2).t())  # a transposed (strided) tensor


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Parameter(torch.randn(6, 4), requires_grad=False)
        self.a, self.b = Block(shared), Block(shared)
        self.head = nn.Linear(4, 3)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_every_storage_moves_once_and_every_holder_follows():
    torch.manual_seed(0)
    model = Model()
    outside = torch.randn(7)  # not the model's: stays
    outside_ptr = _ptr(outside)
    view_elsewhere = model.a.codes.view(-1)  # a holder the model does not list
    before = {name: t.clone() for name, t in
              [("shared", model.a.shared), ("codes", model.a.codes), ("rows", model.a.rows),
               ("held", model.a.held.w), ("pair1", model.b.pair[1]),
               ("weight", model.head.weight), ("bias", model.head.bias)]}
    old = [model.a.shared.untyped_storage(), model.a.codes.untyped_storage(),
           model.b.held.w.untyped_storage(), model.head.weight.untyped_storage()]
    old_ptrs = {s.data_ptr() for s in old}  # (kept alive here: no address is reused)
    distinct = weights_pool.storage_sizes(model, torch.device("cpu"))
    made: list[int] = []

    @contextlib.contextmanager
    def pool():
        yield
        made.append(1)

    count, nbytes = weights_pool.compact(model, torch.device("cpu"), pool)
    # the shared parameter once; 2 × (codes, held, pair's two); head weight and bias
    assert count == len(distinct) == 1 + 2 * 4 + 2 == len(made)
    assert nbytes == sum(distinct.values())
    assert model.a.shared is model.b.shared and _ptr(model.a.shared) == _ptr(model.b.shared)
    assert isinstance(model.a.shared, nn.Parameter)
    for t in (model.a.shared, model.a.codes, model.b.held.w, model.head.weight):
        assert _ptr(t) not in old_ptrs
    # views follow their base: same new storage, same offset, writes seen through both
    assert _ptr(model.a.rows) == _ptr(model.a.codes) == _ptr(view_elsewhere)
    assert model.a.rows.storage_offset() == 16 and model.a.rows.shape == (3, 8)
    assert model.b.pair[1].stride() == (1, 2)
    after = {"shared": model.a.shared, "codes": model.a.codes, "rows": model.a.rows,
             "held": model.a.held.w, "pair1": model.b.pair[1], "weight": model.head.weight,
             "bias": model.head.bias}
    for name, t in after.items():
        assert torch.equal(t, before[name]), name
    model.a.codes[2, 0] = 200
    assert int(model.a.rows[0, 0]) == 200 and int(view_elsewhere[16]) == 200
    assert _ptr(outside) == outside_ptr
    gc.collect()
    on_old = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)
              and not o.is_meta and _ptr(o) in old_ptrs]
    assert on_old == []
    y = model.head(torch.ones(1, 4))  # the module still runs on the moved weights
    assert torch.allclose(y, before["weight"].sum(1) + before["bias"])


def test_a_failed_copy_leaves_the_moved_ones_moved_and_the_rest_in_place():
    model = Model()
    weights = model.head.weight.clone()
    calls = []

    @contextlib.contextmanager
    def refusing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        yield

    try:
        weights_pool.compact(model, torch.device("cpu"), refusing)
    except RuntimeError as exc:
        assert "out of memory" in str(exc)
    else:
        raise AssertionError("the refused copy did not raise")
    assert torch.equal(model.head.weight, weights)  # every tensor still valid
    assert model.a.shared is model.b.shared


def test_the_switch():
    assert weights_pool.wanted({})
    assert weights_pool.wanted({"PENSIEVE_WEIGHTS_POOL": "1"})
    assert not weights_pool.wanted({"PENSIEVE_WEIGHTS_POOL": "0"})


def test_a_cuda_start_moves_the_weights_before_any_graph_is_captured():
    """``finish_on_cuda`` (the end of a CUDA build, before the runner captures graphs) calls it."""
    import inspect

    from pensieve.backends import torch_backend

    src = inspect.getsource(torch_backend.finish_on_cuda)
    assert "weights_pool.compact_on_cuda(" in src
    assert src.index("weights_pool.compact_on_cuda(") > src.index("cuda_moe_tune.prepare(")
