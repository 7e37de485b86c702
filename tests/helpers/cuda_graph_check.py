"""One check for CUDA tests: a kernel or layer captured in a CUDA graph replays as it runs eagerly."""

from __future__ import annotations

from collections.abc import Callable

import torch


def assert_replays_as_eager(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            rounds: int = 3) -> None:
    """Capture ``fn(x)`` (after one eager call: compiles, workspaces), then refill ``x`` in place
    ``rounds`` times: each replay's output equals ``fn`` run eagerly on the new ``x``, bit for bit."""
    fn(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(x)
    for _ in range(rounds):
        x.normal_()
        graph.replay()
        torch.testing.assert_close(y, fn(x), atol=0, rtol=0)
