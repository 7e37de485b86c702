"""What a model's weights hold, against the GGUF they came from (issue 11: ≤ 1.1× on the GPU).

* ``held_bytes(model)`` — every parameter and persistent buffer once (a tied table counted once):
  the weights as built, on whatever device. The CUDA start log reports it; a CPU test builds
  the CUDA layers of a small file on the CPU (their buffers are the same) and counts it.
* ``cuda_bytes(ggml_type, shape)`` — the same, computed from one GGUF tensor's type and shape by
  the CUDA layouts' sizes, without building anything (``bench/gpu_weight_bytes.py`` applies it
  to a file's tensor list, e.g. the Qwen3-8B Q4_K_M shape, without writing the file).
* ``gguf_tensor_bytes(path)`` — the file's tensor data.

Sizes a weight in the CUDA layouts (``cuda_int4``, ``cuda_q6k``, ``cuda_int8``, ``cuda_moe``):
Q4_0 18 bytes a 32 (the file's; MoE experts 20); Q4_1 and Q4_K 20 a 32 (a float16 scale and
offset per 32; the file's Q4_K is 18), except Q4_K MoE experts: the file's 144 a 256
(``cuda_moe``'s ``q4k``: the codes and each super-block's d, dmin and 12 scale bytes as they
are; 160 with ``PENSIEVE_MOE_Q4K_SUPER=0``); Q6_K 210 a 256 (the file's, experts too); the
int8-code types one byte a code plus float16 scales (and offsets); MXFP4 experts the file's 17 bytes a 32
(``cuda_moe``'s packed ``fp4``; 34, int8 codes + a float16 scale, with ``PENSIEVE_MXFP4_INT8=1``).
Other tensors (norms, biases, routers, float matrices) are held in the model's dtype.
"""

from __future__ import annotations

import math
from pathlib import Path

from gguf import GGMLQuantizationType as Q
from torch import nn

BYTES_PER_32 = {  # bytes a group of 32 weights (2-D projections and tables)
    Q.Q4_0: 18, Q.Q4_1: 20, Q.Q4_K: 20, Q.Q8_0: 34, Q.Q5_0: 34, Q.Q5_1: 36, Q.Q5_K: 36,
    Q.IQ4_NL: 34, Q.IQ4_XS: 34,
}


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers, each tensor once."""
    seen: set[tuple[int, int, str]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        if t is None:
            continue
        key = (t.data_ptr(), t.nbytes, str(t.device))
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def cuda_bytes(ggml_type: Q, shape: tuple[int, ...], float_bytes: int = 2) -> int:
    """Bytes the CUDA model holds for one GGUF tensor of ``ggml_type`` and torch-order ``shape``
    (a 3-D one: MoE experts); a tensor the layouts do not take, in the model's float dtype."""
    n = math.prod(shape)
    if len(shape) in (2, 3) and shape[-1] % 32 == 0:
        if ggml_type is Q.Q6_K and shape[-1] % 256 == 0:
            return n // 256 * 210
        if ggml_type is Q.Q4_K and len(shape) == 3 and shape[-1] % 256 == 0:
            from pensieve.backends.cuda_moe import q4k_super

            return n // 256 * (144 if q4k_super() else 160)
        if ggml_type is Q.Q4_0 and len(shape) == 3:
            return n // 32 * 20  # MoE experts keep Q4_0's offsets too
        if ggml_type is Q.MXFP4 and len(shape) == 3:
            # gpt-oss's experts: the file's bytes, or int8 codes + a float16 scale (opt-out)
            from pensieve.backends.cuda_moe import mxfp4_packed

            return n // 32 * (17 if mxfp4_packed() else 34)
        if ggml_type in BYTES_PER_32:
            return n // 32 * BYTES_PER_32[ggml_type]
    return n * float_bytes


def gguf_tensor_bytes(path: str | Path) -> int:
    """The bytes of a GGUF file's tensor data (every tensor, as stored)."""
    from pensieve.loaders.gguf_file import GGUFFile

    return sum(info.nbytes for info in GGUFFile(path).tensors.values())
