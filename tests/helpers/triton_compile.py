"""Compile a Triton kernel for an NVIDIA GPU on a machine without one (Triton's own ptxas).

Catches what the interpreter cannot — a tile or layout the compiler refuses, shared memory
past the limit — before a device run. ``aligned`` names the arguments the GPU's JIT would
specialise as divisible by 16 (torch's tensors are 16-byte aligned; ints such as K when they
are): without it pointers carry no alignment and every load compiles byte- or half-wide, which
is not the code a GPU runs — read load widths (``asm['ptx']``) only from an aligned build. ``compile_for`` skips the test on a GPU machine (the
kernels run there) and where this Triton lacks the ahead-of-time API.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import pytest


def compile_for(fn: Any, types: Mapping[str, str], consts: Mapping[str, Any], num_warps: int,
                num_stages: int, arch: int = 90, aligned: Iterable[str] | bool = ()) -> Any:
    """``fn`` (a ``@triton.jit`` function) compiled for ``sm_{arch}``: ``types`` the Triton type
    of each runtime argument (``"*bf16"``, ``"i32"``...), ``consts`` the constexpr values;
    ``aligned``: the arguments divisible by 16 as the runtime JIT specialises them (True: every
    pointer)."""
    import torch

    if torch.cuda.is_available():  # the kernels themselves run there (and its Triton may differ)
        pytest.skip("the compiled kernels are checked on this GPU")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    params = inspect.signature(fn.fn).parameters
    names = list(params)
    signature, constexprs, attrs = {}, {}, {}
    div16 = ({n for n in types if types[n].startswith("*")} if aligned is True
             else set(aligned or ()))
    for i, name in enumerate(names):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        elif name not in types and params[name].default is not inspect.Parameter.empty:
            # a constexpr the caller leaves at its default (a kernel's newer option)
            signature[name], constexprs[(i,)] = "constexpr", params[name].default
        else:
            signature[name] = types[name]
            if name in div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
