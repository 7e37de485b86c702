"""PyTorch's CUDA int4 matmul (``aten._weight_int4pack_mm``, "tinygemm") over our int4 codes.

For 2 to 8 activation rows it beats both our Triton kernels and cuBLAS on a bf16 copy at
the 8B shapes on an H100 (bench/gpu_int4.py), so ``CudaInt4Linear`` keeps a second copy of
its codes in tinygemm's layout for those. tinygemm wants bfloat16 activations, groups of
32 here, codes two to a byte with the even column in the high nibble, and bfloat16
(scale, zero) pairs ``[K/32, N, 2]`` with ``w = (q − 8)·scale + zero`` — the pairs are
rounded to bfloat16, unlike our float16 ones. The layout is checked against our own
dequantisation once per process (``works``) before any layer uses it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP = 32
INNER_K_TILES = 8  # tinygemm's K tiling: K must be a multiple of 16 × this


@dataclass(frozen=True)
class TinyGemm:
    packed: torch.Tensor  # tinygemm's int32 layout
    scales_and_zeros: torch.Tensor  # [K/32, N, 2] bfloat16

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, GROUP, self.scales_and_zeros)


def supported(in_features: int) -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and in_features % (16 * INNER_K_TILES) == 0)


def pack(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> TinyGemm:
    """codes [N, K] uint8 (0..15), scales/offsets [N, K/32] float, all on the GPU."""
    nibbles = (codes[:, 0::2] << 4) | codes[:, 1::2]
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), INNER_K_TILES)
    zeros = offsets.float() + 8 * scales.float()
    sz = torch.stack([scales.float().t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
    return TinyGemm(packed, sz)


@functools.cache
def works(device: str = "cuda") -> bool:
    """Our codes through tinygemm give our dequantised matmul (else: a layout we got wrong,
    or an op this build lacks)."""
    if not supported(256):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        n, k = 64, 256
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device, generator=gen)
        scales = torch.rand(n, k // GROUP, device=device, generator=gen) * 0.01 + 0.001
        offsets = -8 * scales + torch.randn(n, k // GROUP, device=device, generator=gen) * 1e-3
        w = (codes.float().view(n, k // GROUP, GROUP) * scales[..., None] + offsets[..., None])
        x = torch.randn(4, k, device=device, generator=gen).to(torch.bfloat16)
        ref = x.float() @ w.view(n, k).T
        got = pack(codes, scales, offsets)(x).float()
        return bool(((got - ref).norm() / ref.norm()).item() < 2e-2)
    except (RuntimeError, NotImplementedError):
        return False
