"""Weight-only quantised CPU kernels (q4 group-32 affine, q8 group-32) and modules using them.

``load_kernels()`` compiles the C++ source once (cached on disk) and returns None where that
is impossible; ``Q4Linear``/``Q8Linear``/``Q8Embedding`` run on what it returns.
"""

from pensieve.backends.cpu_quant.build import (
    KernelBuildError, Kernels, build_kernels, cpu_supported, load_kernels,
)
from pensieve.backends.cpu_quant.linear import (
    Q4Linear, Q8Embedding, Q8Linear, kernel_fits, pack_q4, pack_q8,
)

__all__ = [
    "KernelBuildError", "Kernels", "Q4Linear", "Q8Embedding", "Q8Linear", "build_kernels",
    "cpu_supported", "kernel_fits", "load_kernels", "pack_q4", "pack_q8",
]
