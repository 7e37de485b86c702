"""The Llama architecture (RMSNorm, RoPE, GQA, SwiGLU), over the engine's paged KV cache.

Reads top to bottom like the reference: Args → Attention → MLP → Block → Model. Weight names
are Hugging Face's, so ``load_state_dict`` takes a loader's ``Checkpoint.weights`` as is.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import ModelArgs
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
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(self.layer, q, k, v, ctx, cos_sin)  # applies RoPE to q and k
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        bias = args.mlp_bias
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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


class LlamaBody(nn.Module):
    """``model.*`` in HF naming: embeddings, decoder layers, final norm."""

    def __init__(self, args: ModelArgs, max_positions: int) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(
            args.head_dim, max_positions, args.rope_theta, args.rope_scaling
        )
        # nn.Embedding's own init, except on the meta device (a checkpoint's model), where
        # normal_ would import torch._dynamo: ~2.5 s of a server's start-up
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(
            DecoderLayer(args, i) for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Token ids in, logits for the rows the engine asks for out."""

    # our fused parameter ← the HF parameters whose rows it concatenates, in order
    PACKED = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    }

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaBody(args, max_positions or args.max_position_embeddings)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns float32 logits [len(ctx.logits_indices), V]."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = tuple(t.to(x.dtype) for t in self.model.rotary.lookup(positions))
        for layer in self.model.layers:
            x = layer(x, cos_sin, ctx)
        x = self.model.norm(x[ctx.logits_indices])
        return self.lm_head(x).float()
