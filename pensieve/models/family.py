"""What a model family declares: its configs, its GGUF names, its module, its fast paths.

Each ``models/<family>.py`` ends with one ``Family`` value; ``models/registry.py`` lists them.
Loaders ask the family how to read a ``config.json`` or GGUF metadata into ``ModelArgs``,
which GGUF tensor is which HF weight, which weights the module expects; backends ask it which
fast paths the model may take (``FastPaths``) — never ``isinstance`` on a module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pensieve.models.args import ModelArgs
from pensieve.models.cache_spec import LayerCache, attention_layout

Shapes = dict[str, tuple[int, ...]]


class ModelConfigError(ValueError):
    """A config or metadata value the family cannot build a model from (loaders add the path)."""


@dataclass(frozen=True)
class FastPaths:
    """Optimised paths a model may take; each is a promise that the path computes what the
    module does for this model (same norms, attention, activation).

    ``cpu_decoder``: the one-call C decoder of a q4 step (``backends/cpu_quant/decoder.py``:
    RMSNorm → fused qkv (+bias) → RoPE → full attention → o → RMSNorm → SiLU-gated MLP).
    ``cpu_moe_decoder``: the same one-call decoder for MoE layers: per-head q/k RMSNorms where
    the layer has them, and a softmax top-k router (renormalised where ``norm_topk``) over SiLU
    experts, no shared expert (``backends/cpu_quant/moe_decoder.py``).
    ``cpu_fused_mlp``: the q4 SiLU-gated MLP in one kernel (``Q4MLP``).
    ``paged_kernels``: the compiled paged-attention backends (CPU kernel, CUDA Triton), which
    attend over the whole context (no windows).
    ``cuda_graphs``: decode and chunk steps replayed as CUDA graphs (needs ``paged_kernels``).
    ``cuda_fused_layers``: SiLU·mul and residual-add + RMSNorm kernels in the Llama block.
    ``cpu_moe_codes``: a GGUF's stacked expert weights stay codes on the CPU kernels, each
    routed expert run on its slice (``backends/cpu_quant/expert_linear.py``: ``models.moe``'s
    ``Experts`` semantics, any activation).
    ``cuda_latent_attention``: on CUDA, latent (MLA) layers hand a step's decode rows and short
    chunks to one batched kernel over the paged latent cache (``backends/cuda_mla.py``: the
    absorbed query against latent + rotary key, the latent as value); it stays on for the
    hybrid cache layout latent models have.
    ``cuda_moe_codes``: on CUDA a checkpoint's stacked expert codes run on ``backends/cuda_moe``'s
    fused kernels, biases and activation included (gpt-oss's ``ClampedSwiGLUExperts``; the
    SiLU families get the kernels through ``cpu_moe_codes``).
    """

    cpu_decoder: bool = False
    cpu_moe_decoder: bool = False
    cpu_fused_mlp: bool = False
    paged_kernels: bool = False
    cuda_graphs: bool = False
    cuda_fused_layers: bool = False
    cpu_moe_codes: bool = False
    cuda_latent_attention: bool = False
    cuda_moe_codes: bool = False


LLAMA_BLOCK = FastPaths(cpu_decoder=True, cpu_fused_mlp=True, paged_kernels=True,
                        cuda_graphs=True, cuda_fused_layers=True)


@dataclass(frozen=True)
class GGUFNames:
    """llama.cpp tensor names → HF names: ``globals`` whole names, ``blocks`` the part
    between ``blk.N.`` and ``.weight``/``.bias`` (or, keyed with that suffix, e.g.
    ``exp_probs_b.bias``, the whole HF parameter name after ``model.layers.N.``).
    ``permute_qk``: llama.cpp's converter interleaved the rotary halves of Q/K rows for this
    family (undone on load)."""

    globals: Mapping[str, str]
    blocks: Mapping[str, str]
    permute_qk: bool = False
    ignored: frozenset[str] = frozenset()  # tensors read elsewhere (RoPE factors) or unused

    _BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z0-9_.]+)\.(weight|bias|scale)")

    def hf_name(self, gguf_name: str) -> str | None:
        if gguf_name in self.globals:
            return self.globals[gguf_name]
        m = self._BLOCK_RE.fullmatch(gguf_name)
        if m and f"{m.group(2)}.{m.group(3)}" in self.blocks:
            return f"model.layers.{m.group(1)}.{self.blocks[f'{m.group(2)}.{m.group(3)}']}"
        if m and m.group(2) in self.blocks:
            return f"model.layers.{m.group(1)}.{self.blocks[m.group(2)]}.{m.group(3)}"
        return None


GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# GLM's / DeepSeek's multi-token-prediction block, written by llama.cpp after the trunk's
# layers (``blk.{n_layer}.nextn.*``); its HF names are ``model.layers.{n_layer}.*``
NEXTN_NAMES = {
    "nextn.eh_proj": "eh_proj", "nextn.enorm": "enorm", "nextn.hnorm": "hnorm",
    "nextn.embed_tokens": "embed_tokens", "nextn.shared_head_head": "shared_head.head",
    "nextn.shared_head_norm": "shared_head.norm",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def past_trunk(name: str, args: ModelArgs) -> bool:
    """Whether HF weight ``name`` belongs to a layer after the model's ``num_layers`` (a
    multi-token-prediction block), to Qwen3-Next's / Qwen3.5's ``mtp.*`` block or to a
    multimodal checkpoint's vision or audio tower (``model.visual.*``, Gemma 4's
    ``model.{vision,audio}_tower.*`` and ``model.embed_{vision,audio}.*``)."""
    if name.startswith(("mtp.", "model.visual.", "model.vision_tower.", "model.audio_tower.",
                        "model.embed_vision.", "model.embed_audio.")):
        return True
    m = _LAYER_RE.match(name)
    return m is not None and int(m.group(1)) >= args.num_layers


@dataclass(frozen=True)
class GGUFSource:
    """What a family reads from a GGUF: ``meta`` its key/value metadata, ``shapes`` every
    tensor's torch shape by llama.cpp name, ``arch`` the ``general.architecture`` value,
    ``vectors`` small float tensors the loader decoded for the family (RoPE factors)."""

    arch: str
    meta: Mapping[str, Any]
    shapes: Mapping[str, tuple[int, ...]]
    vectors: Mapping[str, list[float]] = field(default_factory=dict)

    def key(self, suffix: str, default: Any = ...) -> Any:
        """``{arch}.{suffix}``; ModelConfigError when absent without a default."""
        value = self.meta.get(f"{self.arch}.{suffix}", default)
        if value is ...:
            raise ModelConfigError(f"GGUF metadata lacks {self.arch}.{suffix}")
        return value

    def scalar(self, suffix: str, default: Any = ...) -> Any:
        value = self.key(suffix, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelConfigError(f"per-layer {self.arch}.{suffix} is not supported")
            value = value[0]
        return value


@dataclass(frozen=True)
class Family:
    """One architecture's home. ``model`` is built as ``model(args, max_positions=...)``."""

    name: str
    gguf_architectures: tuple[str, ...]
    hf_model_types: tuple[str, ...]
    model: type[nn.Module]
    args_from_hf: Callable[[Mapping[str, Any]], ModelArgs]
    args_from_gguf: Callable[[GGUFSource], ModelArgs]
    gguf_names: GGUFNames
    expected_shapes: Callable[[ModelArgs], Shapes]
    fast_paths: Callable[[ModelArgs, int], FastPaths]
    # an HF checkpoint's weight as the module holds it (e.g. Gemma's norms store w, we keep 1+w)
    from_hf_weight: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, w: w
    # a GGUF's weight as the module holds it, by HF name
    from_gguf_weight: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, w: w
    # whether a GGUF of one of ``gguf_architectures`` is this family's (by its metadata):
    # llama.cpp writes Mixtral as ``llama`` with ``llama.expert_count``
    gguf_match: Callable[[Mapping[str, Any], str], bool] = lambda meta, arch: True
    # an HF checkpoint's name segments → the module's (Mixtral's ``block_sparse_moe.w1`` →
    # ``mlp.gate_proj``); per-expert matrices are stacked by the loader (loaders/hf_experts.py)
    hf_renames: Mapping[str, str] = field(default_factory=dict)
    # what each layer keeps between steps (models/cache_spec.py); default: paged K/V everywhere
    cache_layout: Callable[[ModelArgs], tuple[LayerCache, ...]] = attention_layout
    # how an HF checkpoint holds fused 3-D experts (loaders/hf_experts.py): "stacked"
    # (transformers 5's [E, 2I, H] gate rows then up rows) or "gpt_oss" ([E, H, 2I] with
    # gate/up columns interleaved, biases, MXFP4 blocks/scales)
    hf_expert_layout: str = "stacked"
    # a GGUF's fused 3-D tensor read as its parts (HF name suffix → the parts' suffixes), each
    # every expert's next rows: Gemma 4's ffn_gate_up_exps → gate_proj, up_proj (so the
    # experts can stay codes the way the other MoE families' do)
    gguf_splits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # layers after ``num_layers`` in a checkpoint (GLM's / DeepSeek's multi-token-prediction
    # block, ``past_trunk``) are skipped by the loaders: never read, never run
    drops_mtp: bool = False
