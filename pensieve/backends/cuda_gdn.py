"""A Gated DeltaNet layer's conv + gated delta rule + gated norm in two kernels on CUDA.

The torch path (``models/qwen3_next.GatedDeltaNet``) runs a decode step as ~110 ATen ops a
layer on the torch forms (conv step, L2 norms, gates, the recurrent update, the gated RMSNorm,
state gathers and index copies; fewer with fla's recurrent kernel) and a 40-token chunk as
~170: at b=1 on Qwen3.6's 30 such layers, most of a step's launches
(``bench/hybrid_op_count.py``). Here, per layer and step, ``conv_step`` and
``delta_step`` (``cuda_gdn_kernels.py``) take every sequence of the step at once — decode rows
and chunks of at most ``max_tokens`` new tokens (short prefills) — each
from and back into its state slot in place; longer chunks stay on the module's torch path
(the chunked form). No host reads: a static decode step (``RecurrentStates.cached``) is
captured by ``cuda_hybrid_graphs`` as before.

Installed on each ``GatedDeltaNet`` as ``step_kernel`` by ``install`` at a CUDA runner's start;
``PENSIEVE_GDN_KERNEL=0`` leaves the torch path. ``PENSIEVE_GDN_KERNEL_MAX_TOKENS`` bounds the
chunks it takes (the kernel walks a chunk token by token: 64 where fla-core's chunked kernels
take the longer ones, else 256 — estimates, unmeasured; ``bench/gdn_step.py`` times both);
``PENSIEVE_GDN_KERNEL_BV`` splits a value head over programs (then the gated norm runs in torch). Importing this module
needs no GPU; Triton loads on first use.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from pensieve.models.forward_context import ForwardContext

log = logging.getLogger(__name__)
ENV_SWITCH = "PENSIEVE_GDN_KERNEL"
ENV_MAX_TOKENS = "PENSIEVE_GDN_KERNEL_MAX_TOKENS"
ENV_BV = "PENSIEVE_GDN_KERNEL_BV"
CONV_BLOCK = 256


def enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether Gated DeltaNet layers take the fused kernels on CUDA (``PENSIEVE_GDN_KERNEL=0``:
    the torch path)."""
    return (os.environ if environ is None else environ).get(ENV_SWITCH, "1") != "0"


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class GatedDeltaKernel:
    """The ``step_kernel`` of every Gated DeltaNet layer of a model (one instance, shared: the
    step's sequence metadata is built once per ``ForwardContext`` and reused by each layer)."""

    def __init__(self, max_tokens: int | None = None, block_v: int | None = None) -> None:
        env = os.environ
        if max_tokens is None:
            from pensieve.models.gated_delta import fla_available

            # fla's chunked kernels take long chunks faster than a token-by-token walk
            max_tokens = int(env.get(ENV_MAX_TOKENS, "64" if fla_available() else "256"))
        self.max_tokens = max_tokens
        self.block_v = block_v if block_v is not None else int(env.get(ENV_BV, "0")) or None
        self._meta: tuple[Any, Any] | None = None  # (the step's states, its metadata)

    def _step_meta(self, ctx: ForwardContext, device: torch.device
                   ) -> tuple[torch.Tensor | None, list[int]]:
        """([4, N] int64 device rows: start, length, slot, cached) for the sequences the
        kernel takes, and the indices of those it leaves to the torch path; once per step."""
        states = ctx.states
        assert states is not None
        if self._meta is not None and self._meta[0] is states:
            return self._meta[1]
        take = [i for i, s in enumerate(ctx.sequences) if s.query_len <= self.max_tokens]
        rest = [i for i, s in enumerate(ctx.sequences) if s.query_len > self.max_tokens]
        meta = None
        if take:
            host = np.asarray([[ctx.sequences[i].query_start for i in take],
                               [ctx.sequences[i].query_len for i in take],
                               [0] * len(take),
                               [int(ctx.sequences[i].context_len > ctx.sequences[i].query_len)
                                for i in take]], dtype=np.int64)
            meta = torch.from_numpy(host).to(device, non_blocking=True)
            idx = torch.tensor(take, dtype=torch.int64).to(device, non_blocking=True) \
                if len(take) != len(ctx.sequences) else None
            meta[2] = states.slots if idx is None else states.slots[idx]
        self._meta = (states, (meta, rest))
        return meta, rest

    def __call__(self, module: nn.Module, mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 z: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The layer's normed output [T, Hv, Dv] (mixed's dtype) for every row of the step;
        the states of the step's sequences advanced in place."""
        states = ctx.states
        assert states is not None
        layer = module.layer
        conv, ssm = states.conv[layer], states.ssm[layer]
        out = mixed.new_empty(mixed.shape[0], module.d.value_heads, module.d.value_dim)
        if states.cached is not None:  # a static decode step: row i is sequence i's token
            self.run(module, mixed, a, b, z, conv, ssm, out, states.slots, states.cached, None)
            return out
        meta, rest = self._step_meta(ctx, mixed.device)
        if meta is not None:
            self.run(module, mixed, a, b, z, conv, ssm, out, meta[2], meta[3], meta)
        for i in rest:
            module.torch_sequence(mixed, z, b, a, ctx, i, out)
        return out

    def run(self, module: nn.Module, mixed: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
            z: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor, out: torch.Tensor,
            slots: torch.Tensor, cached: torch.Tensor, meta: torch.Tensor | None) -> None:
        """Both kernels over ``slots``' sequences: rows ``meta[0]`` + [0, ``meta[1]``) each
        (None: row i is sequence i's one token)."""
        from pensieve.backends.cuda_gdn_kernels import conv_step, delta_step

        d = module.d
        n = slots.shape[0]
        weight = module.conv1d.weight.reshape(d.conv_channels, -1)
        k = weight.shape[1]
        assert conv.stride(-1) == 1 and ssm.is_contiguous() and conv.shape[-1] == k - 1
        # the projections' split views as they lie (rows strided, each row's values packed):
        # a copy only where a layout interleaves them
        if mixed.stride(-1) != 1:
            mixed = mixed.contiguous()
        if z.stride(-1) != 1 or z.stride(1) != d.value_dim:
            z = z.contiguous()
        if a.stride(-1) != 1 or b.stride(-1) != 1 or a.stride(0) != b.stride(0):
            a, b = a.contiguous(), b.contiguous()
        starts, lens = (meta[0], meta[1]) if meta is not None else (slots, slots)
        decode = meta is None
        y = torch.empty(mixed.shape, dtype=mixed.dtype, device=mixed.device)
        c = d.conv_channels
        block_c = min(CONV_BLOCK, _pow2(c))
        conv_step[(n, -(-c // block_c))](
            mixed, y, weight.contiguous(), conv, starts, lens, slots, cached, c,
            mixed.stride(0), y.stride(0), conv.stride(0), conv.stride(1),
            K=k, BC=block_c, DECODE=decode, num_warps=4)
        dv_pad = _pow2(d.value_dim)
        bv = min(self.block_v or dv_pad, dv_pad)
        norm = bv >= d.value_dim
        dk_pad = _pow2(d.key_dim)
        target = out if norm else torch.empty_like(out)
        delta_step[(n, d.value_heads, -(-d.value_dim // bv))](
            y, a, b, z, module.A_log, module.dt_bias, module.norm.weight, ssm, target,
            starts, lens, slots, cached, y.stride(0), a.stride(0), z.stride(0),
            target.stride(0), ssm.stride(0), ssm.stride(1), module.norm.eps,
            HK=d.key_heads, DK=d.key_dim, DK_PAD=dk_pad, HV=d.value_heads, DV=d.value_dim,
            BV=bv, TILED=d.order == "tiled", NORM=norm, DECODE=decode,
            num_warps=8 if dk_pad * bv >= 128 * 64 else 4)
        if not norm:
            out.copy_(module.norm(target, z))


def install(model: nn.Module, kernel: GatedDeltaKernel | None = None) -> int:
    """Set ``step_kernel`` on every Gated DeltaNet layer of ``model``; returns how many."""
    from pensieve.models.qwen3_next import GatedDeltaNet

    kernel = kernel if kernel is not None else GatedDeltaKernel()
    layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    for m in layers:
        m.step_kernel = kernel
    if layers:
        log.info("Gated DeltaNet on the fused CUDA kernels: %d layers (chunks up to %d tokens; "
                 "%s=0: the torch path)", len(layers), kernel.max_tokens, ENV_SWITCH)
    return len(layers)
