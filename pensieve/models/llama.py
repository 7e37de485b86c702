"""The Llama architecture (RMSNorm, RoPE, GQA, SwiGLU), over the engine's paged KV cache.

Reads top to bottom like the reference: Args → Attention → MLP → Block → Model → Family.
Its blocks carry the knobs the Llama-shaped families turn (Qwen2's q/k/v bias, Qwen3's q/k
norms, Mistral's and Phi-3's sliding windows, Phi-3's partial rotary dims); those families'
files declare their configs, names and fast paths and reuse these modules. Weight names are
Hugging Face's, so ``load_state_dict`` takes a loader's ``Checkpoint.weights`` as is (after
``PACKED`` fusing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs
from pensieve.models.config import decoder_shapes, gguf_args, hf_args
from pensieve.models.family import (
    GLOBAL_NAMES, LLAMA_BLOCK, LLAMA_BLOCK_NAMES, Family, FastPaths, GGUFNames, GGUFSource,
)
from pensieve.models.forward_context import ForwardContext, paged_attention
from pensieve.models.rope import RotaryEmbedding

CosSin = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def query_scale(args: ModelArgs) -> float:
    """Factor folded into q so that attention's own 1/√head_dim gives the family's scale."""
    if args.query_pre_attn_scalar is None:
        return 1.0
    return math.sqrt(args.head_dim) / math.sqrt(args.query_pre_attn_scalar)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        bias = args.attention_bias
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        # q, k and v in one matmul (HF's q_proj/k_proj/v_proj rows, concatenated)
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        o_bias = bias if args.attention_out_bias is None else args.attention_out_bias
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=o_bias)
        if args.qk_norm:  # per head, before RoPE
            self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.window = args.window(layer)
        self.q_scale = query_scale(args)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        # applies RoPE to q and k
        out = paged_attention(self.layer, q, k, v, ctx, cos_sin, window=self.window)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


def activation(name: str):  # noqa: ANN201 - a torch function
    if name == "silu":
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported hidden_act {name!r}")


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)
        self.act = activation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


def rotary_dim(args: ModelArgs) -> int:
    dim = int(args.head_dim * args.partial_rotary_factor)
    return dim - dim % 2


class LlamaBody(nn.Module):
    """``model.*`` in HF naming: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs, max_positions: int,
                 layer: type[DecoderLayer] = DecoderLayer) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(
            rotary_dim(args), max_positions, args.rope_theta, args.rope_scaling,
            context_length=max_positions,
        )
        # nn.Embedding's own init, except on the meta device (a checkpoint's model), where
        # normal_ would import torch._dynamo: ~2.5 s of a server's start-up
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(layer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def run(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        """The decoder layers, then the final norm of the rows the engine asks for
        (``backends/cuda_layers.py`` fuses each residual add into the next norm)."""
        for layer in self.layers:
            x = layer(x, cos_sin, ctx)
        return self.norm(x[ctx.logits_indices])


class LlamaForCausalLM(nn.Module):
    """Token ids in, logits for the rows the engine asks for out."""

    # our fused parameter ← the HF parameters whose rows it concatenates, in order
    PACKED: Mapping[str, tuple[str, ...]] = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    }
    LAYER: type[DecoderLayer] = DecoderLayer

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBody(args, max_positions or args.max_position_embeddings, self.LAYER)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        context = max_positions or args.max_position_embeddings
        self.fast_paths: FastPaths = family_of(args).fast_paths(args, context)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns float32 logits [len(ctx.logits_indices), V]."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = tuple(t.to(x.dtype) for t in self.model.rotary.lookup(positions))
        return self.lm_head(self.model.run(x, cos_sin, ctx)).float()


def family_of(args: ModelArgs) -> Family:
    from pensieve.models.registry import family  # the registry imports every family file

    return family(args.architecture)


def llama_block_paths(args: ModelArgs, context_length: int) -> FastPaths:
    """Every fast path of the Llama block, except where windows mask within the context or
    RoPE covers part of a head (the compiled kernels attend over everything, rotate all)."""
    if args.windows_bind(context_length) or rotary_dim(args) != args.head_dim:
        return FastPaths(cpu_fused_mlp=args.hidden_act == "silu")
    if args.qk_norm or args.query_pre_attn_scalar is not None or args.hidden_act != "silu":
        return FastPaths(cpu_fused_mlp=args.hidden_act == "silu", paged_kernels=True,
                         cuda_graphs=True, cuda_fused_layers=args.hidden_act == "silu")
    return LLAMA_BLOCK


def _hf(config: Mapping[str, Any]) -> ModelArgs:
    return hf_args(config, "llama")


def _gguf(src: GGUFSource) -> ModelArgs:
    return gguf_args(src, "llama")


def _dense(meta: Mapping[str, Any], arch: str) -> bool:
    """llama.cpp writes Mixtral as ``llama`` too; those files (experts) are ``models/mixtral.py``'s."""
    return not int(meta.get(f"{arch}.expert_count", 0) or 0)


FAMILY = Family(
    name="llama",
    gguf_architectures=("llama",),
    hf_model_types=("llama",),
    model=LlamaForCausalLM,
    args_from_hf=_hf,
    args_from_gguf=_gguf,
    gguf_names=GGUFNames(GLOBAL_NAMES, LLAMA_BLOCK_NAMES, permute_qk=True,
                         ignored=frozenset({"rope_freqs.weight"})),
    expected_shapes=decoder_shapes,
    fast_paths=llama_block_paths,
    gguf_match=_dense,
)
