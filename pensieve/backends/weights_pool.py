"""A built CUDA model's weights moved into one private memory pool, so that what the load freed
goes back to the driver.

A CUDA start converts the GGUF through temporaries allocated between the weights it keeps. With
expandable segments, ``empty_cache`` unmaps only whole mapping units (20 MiB in the large pool)
that hold nothing, so every kept weight beside a freed temporary pins the unit it ends in:
measured on the Qwen3-30B-A3B Q4_K_M start (H100, session 16), the allocator's own large pool
held 1.72 GiB free after ``empty_cache`` (22.58 GiB reserved, 20.86 allocated) — the gap between
Pensieve's card use and llama.cpp's on the same file (1.18× against a 1.10× target).

``compact`` copies each storage the model's tensors hold (parameters, buffers, tensors in the
modules' attributes, one container deep) into a ``torch.cuda.MemPool`` that holds nothing else,
one storage at a time (the peak is the largest storage over the weights), then points every live
tensor object on that storage — views kept elsewhere included, found by a scan of the garbage
collector's objects — at the copy with ``set_``: the same tensor objects, the same values, a new
address. The old storages are then free in the default pool, and ``empty_cache`` returns them.
It runs before CUDA graphs are captured (a graph keeps the addresses it recorded).

``PENSIEVE_WEIGHTS_POOL=0`` leaves the weights where the load put them. A failure (no
``MemPool`` in this torch, an allocation refused) logs a warning and leaves the storages not yet
moved where they are: every tensor keeps valid values either way.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

import torch
from torch import nn

log = logging.getLogger(__name__)

ENV = "PENSIEVE_WEIGHTS_POOL"


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether a CUDA start moves its weights into their own pool (default on)."""
    return (os.environ if environ is None else environ).get(ENV, "1").strip() != "0"


def _tensors_in(value: Any, depth: int = 2) -> Iterator[torch.Tensor]:
    """Tensors in an attribute: itself, or inside a tuple/list/dict/dataclass ``depth`` deep
    (``cuda_moe.Stack``, a fused layer's tuples); modules are walked by ``model.modules()``."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth <= 0 or isinstance(value, nn.Module):
        return
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v, depth - 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth - 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors_in(getattr(value, f.name, None), depth - 1)


def model_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor the model's modules hold: parameters, buffers and attributes."""
    for module in model.modules():
        yield from module.parameters(recurse=False)
        yield from (b for b in module.buffers(recurse=False) if b is not None)
        for name, value in vars(module).items():
            if not name.startswith("_"):
                yield from _tensors_in(value)


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def storage_sizes(model: nn.Module, device: torch.device) -> dict[tuple[str, int], int]:
    """Bytes of each distinct non-empty storage on ``device`` the model's tensors use, largest
    first (keys only: a storage object kept here would keep the old memory alive)."""
    found: dict[tuple[str, int], int] = {}
    for t in model_tensors(model):
        if t.device == device and t.untyped_storage().nbytes() > 0:
            found.setdefault(_key(t), t.untyped_storage().nbytes())
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def holders(keys: set[tuple[str, int]]) -> dict[tuple[str, int], list[torch.Tensor]]:
    """Every live tensor object (the garbage collector's view) on one of ``keys``' storages."""
    out: dict[tuple[str, int], list[torch.Tensor]] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not obj.is_meta:  # (type: no __class__ hooks)
            try:
                key = _key(obj)
            except RuntimeError:  # tensors without a storage (sparse, wrapper subclasses)
                continue
            if key in keys:
                out.setdefault(key, []).append(obj)
    return out


def compact(model: nn.Module, device: torch.device,
            pool_context: Callable[[], ContextManager[Any]]) -> tuple[int, int]:
    """Copy each storage of the model's tensors on ``device`` under ``pool_context`` (a
    ``torch.cuda.use_mem_pool``; any context on the CPU tests) and point every tensor object
    on it at the copy: (storages moved, bytes moved). One storage at a time, the old one free
    once its last holder moved. Raises what the copy raises; storages already moved stay
    moved (each is swapped only once its copy exists)."""
    sizes = storage_sizes(model, device)
    on = holders(set(sizes))
    moved = nbytes = 0
    with torch.inference_mode():
        for key in sizes:
            ts = on.pop(key, [])
            if not ts:
                continue
            with pool_context():
                new = ts[0].untyped_storage().clone()
            for t in ts:
                t.set_(new, t.storage_offset(), t.shape, t.stride())
            moved += 1
            nbytes += new.nbytes()
            del ts, new
    return moved, nbytes


def compact_on_cuda(model: nn.Module, device: torch.device) -> None:
    """``compact`` into a new ``torch.cuda.MemPool`` kept on the model, where ``wanted``; one
    log line with the bytes moved and the allocator's reserved bytes before and after
    ``empty_cache``. Never fails a start."""
    if not wanted():
        return
    if device.index is None:  # tensors say cuda:N
        device = torch.device(device.type, torch.cuda.current_device())
    try:
        pool = torch.cuda.MemPool()
        model._pensieve_weights_pool = pool  # the pool lives as long as the weights in it
        reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        count, nbytes = compact(model, device, lambda: torch.cuda.use_mem_pool(pool, device))
        gc.collect()
        torch.cuda.empty_cache()
        kept = torch.cuda.memory_allocated(device) - allocated  # old storages something still holds
        log.info("weights moved into their own memory pool: %d storages, %.2f GiB; torch reserved "
                 "%.2f → %.2f GiB (%s=0: not moved)", count, nbytes / 2**30, reserved / 2**30,
                 torch.cuda.memory_reserved(device) / 2**30, ENV)
        if kept > max(nbytes // 50, 64 << 20):
            log.warning("%.2f GiB of the weights' old storages are still held after the move (a "
                        "reference the scan did not see)", kept / 2**30)
    except Exception as exc:  # noqa: BLE001 - memory layout only: the start goes on
        log.warning("weights not moved into their own memory pool (%s); serving from where the "
                    "load put them", exc)

