"""Where the split-K kernels keep their partials and tile counters between calls (host side of
``cuda_splitk_kernels.finish``; imports no Triton).

One (partials, counters) pair per (kernel family, device, N): the layers of one shape share it,
their launches being serial on one stream; two families never share one, since a mixed layer's
parts may run as parallel graph branches (``PENSIEVE_MIXED_STREAMS``). The counters start at zero
and each launch leaves them at zero. Made before graph capture, so graphs keep the same memory.
"""

from __future__ import annotations

import torch

_pairs: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(family: str, device: torch.device, n: int, partials: int,
              outputs_per_counter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 partials of ``partials`` elements (at least one) and int32 zeroed counters, one a
    ``outputs_per_counter`` outputs, for ``family``'s weights with ``n`` outputs."""
    key = (family, str(device), n)
    if key not in _pairs:
        _pairs[key] = (torch.empty(max(partials, 1), device=device, dtype=torch.float32),
                       torch.zeros(-(-n // outputs_per_counter), device=device, dtype=torch.int32))
    return _pairs[key]
