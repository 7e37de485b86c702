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

MoE families that declare ``FastPaths.cpu_moe_decoder`` take it too: per-head q/k RMSNorms
where the layer has them, and the MLP a softmax router over ``SlicedExperts`` run inside the
same call (``moe_decoder.py``; ~33 → ~24 ms a token on a 24-layer Qwen3-MoE on 2 cores: the
module path's ~100 kernel calls and their torch glue gone).
"""

from __future__ import annotations

import ctypes
import time

import torch
from torch import nn

from pensieve.backends.cpu_quant import moe_decoder
from pensieve.backends.cpu_quant.build import Kernels
from pensieve.backends.cpu_quant.codes_linear import Proj, proj_of
from pensieve.backends.cpu_quant.layers import CpuAttentionStep, CpuRMSNorm
from pensieve.backends.cpu_quant.mlp import Q4MLP
from pensieve.models.llama import RMSNorm


class LayerWeights(ctypes.Structure):
    """Mirror of the C ``LayerWeights`` (layer_source.py)."""

    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("proj", Proj * 4), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("q_norm", ctypes.c_void_p), ("k_norm", ctypes.c_void_p),
                ("moe", ctypes.c_void_p)]


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

    Slow steps are weak evidence, fast ones strong: a server's first decode steps fault in its
    mapped weights (an MoE's experts page by page as they are first picked: ~45-60 ms steps
    for ~10 steps of a 2-core Qwen3-MoE, against 25 after), and a preempted step is slow
    however many threads could run. So a setting's first timing is a warm-up, replaced by its
    second; a step faster than its setting's figure replaces it; a slower one moves it by the
    EMA and counts at most ``OUTLIER``× the figure; and "clearly slower" needs ``EVIDENCE``
    timings of that setting. Without these, two slow early 2-thread steps parked that server's
    decode on 1 thread for hundreds of steps (23.5 tok/s instead of ~37).
    """

    CLEAR = 1.25
    OUTLIER = 2.0
    EVIDENCE = 6

    def __init__(self, max_threads: int, explore: int = 32, alpha: float = 0.25) -> None:
        self.options = sorted({1, max(1, max_threads)})
        self.explore, self.alpha = explore, alpha
        self.per_token: dict[int, float] = {}
        self._timed: dict[int, int] = {}
        self._steps = 0

    def pick(self) -> int:
        self._steps += 1
        untried = [t for t in self.options if self._timed.get(t, 0) < 2]
        if untried:
            return untried[0]
        best = min(self.options, key=self.per_token.__getitem__)
        if len(self.options) == 1:
            return best
        other = next(t for t in self.options if t != best)
        clear = (self._timed[other] >= self.EVIDENCE
                 and self.per_token[other] > self.CLEAR * self.per_token[best])
        if self._steps % (self.explore * (4 if clear else 1)) == 0:
            return other
        return best

    def record(self, threads: int, seconds: float, tokens: int) -> None:
        value = seconds / max(tokens, 1)
        timed = self._timed[threads] = self._timed.get(threads, 0) + 1
        old = self.per_token.get(threads)
        if old is None or timed <= 2 or value < old:  # a warm-up, or what the setting can do
            self.per_token[threads] = value
            return
        value = min(value, self.OUTLIER * old)
        self.per_token[threads] = old + self.alpha * (value - old)


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
        dense = [layer.mlp for layer in layers if type(layer.mlp) is Q4MLP]
        moes = [layer.mlp for layer in layers if type(layer.mlp) is not Q4MLP]
        self.hidden = first.input_layernorm.weight.shape[0]
        self.inner = dense[0].inner if dense else 0
        self.max_rows = min([attn.qkv_proj.dense_from, *(m.gate_up_proj.dense_from for m in dense),
                             *(moe_decoder.max_rows(m) + 1 for m in moes)])
        self.tuner = ThreadTuner(threads or torch.get_num_threads())
        self.kv_half = int(k_caches[0].dtype == torch.float16)
        self._fn = kernels.lib.pq_decode_layers
        self._keep = []  # float32 copies the structs point into (biases), kept alive
        self._layers = (LayerWeights * len(layers))(
            *(self._layer(layer, k, v) for layer, k, v in zip(layers, k_caches, v_caches)))

    @staticmethod
    def fits(model: nn.Module, moe: bool = False) -> bool:
        """Every layer: RMSNorms of one eps (per-head q/k ones too, where the layer has them),
        qkv/o on the kernels (any code formats), no query scale, ``Q4MLP`` — or, with ``moe``,
        an MoE block ``moe_decoder.fits``; float32 on the CPU; one inner size of the dense
        MLPs."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not layers:
            return False
        norms = [n for layer in layers for n in _norms(layer)]
        dense = {layer.mlp.inner for layer in layers if type(layer.mlp) is Q4MLP}
        return len({n.eps for n in norms}) == 1 and len(dense) <= 1 and all(
            isinstance(n, (RMSNorm, CpuRMSNorm)) and n.weight.dtype == torch.float32
            for n in norms) and all(
            proj_of(layer.self_attn.qkv_proj) is not None
            and proj_of(layer.self_attn.o_proj) is not None
            and getattr(layer.self_attn, "q_scale", 1.0) == 1.0
            and (type(layer.mlp) is Q4MLP or moe and moe_decoder.fits(layer.mlp))
            and layer.self_attn.qkv_proj.codes.device.type == "cpu"
            for layer in layers)

    def _layer(self, layer: nn.Module, k_cache: torch.Tensor, v_cache: torch.Tensor) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        dense = type(mlp) is Q4MLP
        mlps = (mlp.gate_up_proj, mlp.down_proj) if dense else ()
        linears = (attn.qkv_proj, attn.o_proj, *mlps)
        self._keep.extend(q._bias for q in linears if q._bias is not None)  # what biases point into
        projs = [proj_of(q) for q in linears] + [Proj()] * (4 - len(linears))
        qk = (attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()) if getattr(
            attn, "qk_norm", False) else (None, None)
        moe = None
        if not dense:  # the struct lives as long as the decoder (the layer's field points at it)
            self._keep.append(moe_decoder.moe_weights(mlp))
            moe = ctypes.addressof(self._keep[-1])
        return LayerWeights(
            layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
            (Proj * 4)(*projs), k_cache.data_ptr(), v_cache.data_ptr(), *qk, moe)

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


def _norms(layer: nn.Module) -> list[nn.Module]:
    """A layer's RMSNorms: around attention and MLP, and per head on q and k (Qwen3)."""
    attn = layer.self_attn
    qk = [attn.q_norm, attn.k_norm] if getattr(attn, "qk_norm", False) else []
    return [layer.input_layernorm, layer.post_attention_layernorm, *qk]
