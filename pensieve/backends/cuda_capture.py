"""Capture one CUDA graph: warm up on a side stream, then capture with the collector paused.

The warm-up runs compile Triton kernels and let cuBLAS pick its algorithms before capture
(neither may happen inside it). The collector is paused during capture because a collection
there can free pinned host buffers of an engine no longer used (seen in the CUDA tests, which
build many engines in one process), and the host allocator's event calls invalidate the
capture ("operation failed due to a previous error during capture").
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def capture_graph(run: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:  # noqa: ANN001 - a graph pool handle
    """(graph, its static output) for ``run``, which reads and writes only static buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    paused = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            output = run()
    finally:
        if paused:
            gc.enable()
    return graph, output
