"""The one-launch split-K epilogue the multi-row GEMV/GEMM kernels share (``cuda_int4_kernels``'
``skinny``, ``cuda_int4_skinny2``, ``cuda_int4_rows``, ``cuda_q6k_kernels``' ``skinny``,
``cuda_q6k_split``, ``cuda_q6k_rows``).

With SPLIT_K programs on one output tile, each stores its float32 partial in its slice of the
workspace and bumps the tile's counter; the last to arrive sums the partials in a fixed order
(deterministic), writes the output and resets the counter to 0 for the next call — so one
launch does it all and CUDA graphs capture it (the workspace and the counters persist, the
counters start zeroed). Importing this module needs Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def finish(acc, Y, out, omask, ws, split_stride, CNT, pid_n, pid_k, SPLIT_K: tl.constexpr):
    """Store ``acc`` (float32) at ``out`` (pointers into Y, masked by ``omask``); with SPLIT_K
    > 1 through the workspace: ``ws`` points at split 0's slots for ``out``, split s's are
    ``split_stride`` elements further; ``CNT + pid_n`` is the tile's counter."""
    if SPLIT_K == 1:
        tl.store(out, acc.to(Y.dtype.element_ty), mask=omask)
    else:
        tl.store(ws + pid_k * split_stride, acc, mask=omask)
        tl.debug_barrier()  # all of this program's partial stored before the release below
        done = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):  # fixed order; .cg: from L2, never a stale L1 line
                total += tl.load(ws + s * split_stride, mask=omask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out, total.to(Y.dtype.element_ty), mask=omask)
            tl.atomic_xchg(CNT + pid_n, 0, sem="relaxed", scope="gpu")
