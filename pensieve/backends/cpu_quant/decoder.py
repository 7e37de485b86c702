"""A decode step's decoder layers in one kernel call (``pq_decode_layers``), for quantised Llama-shaped models.

At one token per sequence a 135M model's layer is ~0.3 ms of kernels and, as PyTorch modules,
~0.15 ms of Python between them (module calls, views, adds, argument marshalling): a third
of the step. ``CpuDecoder`` runs the embedding, final norm and output layer as modules and
everything between them in C. It applies only where every layer is exactly what the kernel
does — RMSNorm, fused qkv and o on the compiled kernels (``Q4Linear``, ``Q8Linear`` or
``CodesLinear``: each projection a ``Proj`` of row blocks in their own code formats, so a
Q4_K_M file's Q4_K, Q6_K, Q5_0 and Q8_0 tensors mix in one call), ``Q4MLP`` — and to steps of one-token rows:
decodes, and (model runner) short prefills as one row per new token; the module path otherwise. How many threads a
step uses follows the machine's load (``ThreadTuner``).
"""

from __future__ import annotations

import ctypes
import time

import torch
from torch import nn

from pensieve.backends.cpu_quant.build import Kernels
from pensieve.backends.cpu_quant.codes_linear import Proj, proj_of
from pensieve.backends.cpu_quant.layers import CpuAttentionStep, CpuRMSNorm
from pensieve.backends.cpu_quant.mlp import Q4MLP
from pensieve.models.llama import RMSNorm


class LayerWeights(ctypes.Structure):
    """Mirror of the C ``LayerWeights`` (layer_source.py)."""

    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("proj", Proj * 4), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class ThreadTuner:
    """Threads for the next decode step, by timing: 1 or all, whichever has been faster lately.

    On a quiet machine all cores read weights faster than one; on a busy one (another job on
    the other core) a worker preempted mid-tile makes the step wait a scheduler slice, and
    one thread measured 1.6× faster. Every ``explore``-th step runs the other setting so the
    choice follows the load — every ``4 · explore``-th while the other is more than
    ``CLEAR``× slower (a quiet machine's 1 thread against 2: ~1.8×, where each explored step
    cost ~2% of decode at 32); per-token times are smoothed (EMA), so one slow step decides
    nothing. The setting in use is timed at every step, so a step that turns slow (another job
    took a core) switches as soon as it is slower than the other's last figure.
    """

    CLEAR = 1.25

    def __init__(self, max_threads: int, explore: int = 32, alpha: float = 0.25) -> None:
        self.options = sorted({1, max(1, max_threads)})
        self.explore, self.alpha = explore, alpha
        self.per_token: dict[int, float] = {}
        self._steps = 0

    def pick(self) -> int:
        self._steps += 1
        untried = [t for t in self.options if t not in self.per_token]
        if untried:
            return untried[0]
        best = min(self.options, key=self.per_token.__getitem__)
        if len(self.options) == 1:
            return best
        other = next(t for t in self.options if t != best)
        clear = self.per_token[other] > self.CLEAR * self.per_token[best]
        if self._steps % (self.explore * (4 if clear else 1)) == 0:
            return other
        return best

    def record(self, threads: int, seconds: float, tokens: int) -> None:
        value = seconds / max(tokens, 1)
        old = self.per_token.get(threads)
        self.per_token[threads] = value if old is None else old + self.alpha * (value - old)


class CpuDecoder:
    def __init__(self, kernels: Kernels, model: nn.Module, k_caches: list[torch.Tensor],
                 v_caches: list[torch.Tensor], threads: int | None = None) -> None:
        self.model = model
        body = model.model
        layers = list(body.layers)
        first = layers[0]
        self.eps = first.input_layernorm.eps
        attn = first.self_attn
        self.hq, self.hk, self.d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.hidden, self.inner = first.mlp.hidden, first.mlp.inner
        self.max_rows = min(first.mlp.gate_up_proj.dense_from, attn.qkv_proj.dense_from)
        self.tuner = ThreadTuner(threads or torch.get_num_threads())
        self.kv_half = int(k_caches[0].dtype == torch.float16)
        self._fn = kernels.lib.pq_decode_layers
        self._keep = []  # float32 copies the structs point into (biases), kept alive
        self._layers = (LayerWeights * len(layers))(
            *(self._layer(layer, k, v) for layer, k, v in zip(layers, k_caches, v_caches)))

    @staticmethod
    def fits(model: nn.Module) -> bool:
        """Every layer: RMSNorms of one eps, qkv/o on the kernels (any code formats), ``Q4MLP``;
        float32 on the CPU."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not layers:
            return False
        eps = {layer.input_layernorm.eps for layer in layers} | {
            layer.post_attention_layernorm.eps for layer in layers}
        norms = (RMSNorm, CpuRMSNorm)
        return len(eps) == 1 and all(
            isinstance(layer.input_layernorm, norms)
            and isinstance(layer.post_attention_layernorm, norms)
            and proj_of(layer.self_attn.qkv_proj) is not None
            and proj_of(layer.self_attn.o_proj) is not None
            and type(layer.mlp) is Q4MLP
            and layer.input_layernorm.weight.dtype == torch.float32
            and layer.self_attn.qkv_proj.codes.device.type == "cpu"
            for layer in layers)

    def _layer(self, layer: nn.Module, k_cache: torch.Tensor, v_cache: torch.Tensor) -> LayerWeights:
        linears = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                   layer.mlp.down_proj)
        self._keep.extend(q._bias for q in linears if q._bias is not None)  # what biases point into
        return LayerWeights(
            layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
            (Proj * 4)(*(proj_of(q) for q in linears)), k_cache.data_ptr(), v_cache.data_ptr())

    def can_run(self, num_rows: int, step: CpuAttentionStep) -> bool:
        return not step.longer and step.num_decode == num_rows < self.max_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 step: CpuAttentionStep, block_size: int,
                 logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [M, V] for M one-token rows ``input_ids`` [M] (in ``step``'s order), or for the
        rows ``logits_rows`` only. Rows may be several new tokens of one sequence, each with its
        own context length in ``step`` (all rows' K/V are stored before any row attends)."""
        started = time.perf_counter()
        threads = self.tuner.pick()
        body, head = self.model.model, self.model.lm_head
        x = body.embed_tokens(input_ids).float().contiguous()
        cos, sin = (t.contiguous() for t in body.rotary.lookup(positions))
        m = step.meta
        self._fn(x.data_ptr(), x.shape[0], self.hidden, self.inner, len(self._layers),
                 self._layers, self.eps, self.hq, self.hk, self.d, cos.data_ptr(), sin.data_ptr(),
                 slots.data_ptr(), m[1].data_ptr(), m[2].data_ptr(), step.tables.data_ptr(),
                 block_size, threads, self.kv_half)
        if hasattr(head, "threads"):  # Q8Linear: the step's other big read
            head.threads = threads
        if logits_rows is not None:
            x = x[logits_rows]
        logits = head(body.norm(x)).float()
        self.tuner.record(threads, time.perf_counter() - started, input_ids.shape[0])
        return logits
