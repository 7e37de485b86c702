"""torch's CUDA caching allocator on expandable segments for a CUDA server, unless the user
configured the allocator.

A CUDA start decodes the GGUF through temporaries allocated between the weights it keeps; with
fixed segments, a segment that still holds one weight stays reserved after ``empty_cache``, so
the card shows gigabytes the server never uses (measured: 2.0 GiB reserved over allocated after
the warm-up on the 30B-A3B file). Expandable segments map and unmap pages of one growing range
instead (vLLM made the same default). Asked through the allocator's own setter before the load
allocates — the environment variable's name changed across torch versions (``PYTORCH_ALLOC_CONF``
was read only for some settings in 2.9), the setter did not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)

USER_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
_asked = False


def use_expandable_segments(environ: Mapping[str, str]) -> bool:
    """Ask for expandable segments unless either allocator variable is set; whether asked."""
    global _asked
    if any(k in environ for k in USER_ENV):
        return False
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError) as exc:  # no setter, or no CUDA allocator
        log.warning("could not ask torch's CUDA allocator for expandable segments: %s", exc)
        return False
    _asked = True
    return True


def describe() -> str:
    """The allocator setting this process chose, for the start log."""
    return "expandable segments" if _asked else "torch's defaults or the user's"


def pool_use(segments: list[Mapping], device: int) -> str:
    """Reserved / allocated GiB of ``device``'s segments (``torch.cuda.memory_snapshot()``)
    by pool: the allocator's own (pool id (0, 0)) against the CUDA graphs' private pools —
    where reserved memory over allocated sits (the 30B-A3B start held 2.1 GiB more reserved
    than allocated after ``empty_cache`` with expandable segments; session 16's line put 1.72
    GiB of it free in the allocator's own large pool, 0.08 in the graph pools). Private pools
    are the CUDA graphs' and the weights' own (``weights_pool``)."""
    pools: dict[str, list[int]] = {}
    for seg in segments:
        if seg.get("device", device) != device:
            continue
        own = tuple(seg.get("segment_pool_id") or (0, 0)) == (0, 0)
        kind = seg.get("segment_type", "")  # "small" (≤ 1 MiB blocks) or "large"
        name = ("the allocator's pool" if own else "private pools") + (f" ({kind})" if kind else "")
        use = pools.setdefault(name, [0, 0, 0])
        use[0] += int(seg.get("total_size", 0))
        use[1] += int(seg.get("allocated_size", 0))
        use[2] += 1
    return "; ".join(f"{name} {r / 2**30:.2f} GiB reserved, {a / 2**30:.2f} allocated "
                     f"({n} segments)" for name, (r, a, n) in sorted(pools.items())) or "none"


def describe_pools(device: torch.device) -> str:
    """``pool_use`` of the live allocator (a sentence for the start log; never raises)."""
    try:
        return pool_use(torch.cuda.memory_snapshot(), device.index or 0)
    except Exception as exc:  # noqa: BLE001 - a diagnostic line: never fails a start
        return f"unavailable ({exc})"
