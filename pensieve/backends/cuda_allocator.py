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
