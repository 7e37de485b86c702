"""A tiny hybrid model over every kind of layer cache, for the KV manager's exactness tests.

Layers: a recurrent layer (a short causal convolution, then a decaying linear-attention state,
the shape of Gated DeltaNet without its delta rule), full attention, sliding-window attention,
latent attention (one cached vector a token, keys and values expanded from it) and another
recurrent layer, each ``x + layer(norm(x))``. It follows the cache contract
(``models/cache_spec.py``): a sequence continues from its slot's state when
``context_len > query_len``, else from zeros, and leaves its state in the slot. Correct means
the same logits whether a prompt runs whole, in chunks, or resumed from a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pensieve.backends.torch_backend import torch_engine
from pensieve.engine.config import EngineConfig
from pensieve.engine.engine import Engine
from pensieve.models.args import ModelArgs
from pensieve.models.cache_spec import LayerCache, PagedKV, RecurrentState
from pensieve.models.family import FastPaths
from pensieve.models.forward_context import ForwardContext, paged_attention
from tests.helpers.tiny_engine import ByteTokenizer

HIDDEN, HEADS, HEAD_DIM, CONV, STATE, LATENT = 32, 2, 8, 3, 8, 12
WINDOW = 8
KINDS = ("recurrent", "full", "window", "latent", "recurrent")


def tiny_recurrent_args(vocab: int = 257) -> ModelArgs:
    return ModelArgs(architecture="tiny_recurrent", vocab_size=vocab, hidden_size=HIDDEN,
                     intermediate_size=64, num_layers=len(KINDS), num_heads=HEADS,
                     num_kv_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=1024)


def layout(kinds: tuple[str, ...] = KINDS) -> tuple[LayerCache, ...]:
    specs = {"recurrent": RecurrentState((CONV - 1, HIDDEN), (STATE, STATE)),
             "full": PagedKV(HEADS, HEAD_DIM, HEAD_DIM),
             "window": PagedKV(HEADS, HEAD_DIM, HEAD_DIM, WINDOW),
             "latent": PagedKV(1, LATENT, 0)}
    return tuple(specs[k] for k in kinds)


class Recurrent(nn.Module):
    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.conv = nn.Parameter(torch.randn(CONV, HIDDEN) * 0.5)
        self.qkv = nn.Linear(HIDDEN, 3 * STATE, bias=False)
        self.decay = nn.Parameter(torch.rand(STATE) * 0.5 + 0.45)
        self.out = nn.Linear(STATE, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        states = ctx.states
        assert states is not None
        conv_all, ssm_all = states.conv[self.layer], states.ssm[self.layer]
        assert conv_all is not None and ssm_all is not None
        out = torch.empty_like(x)
        for i, seq in enumerate(ctx.sequences):
            slot = int(states.slots[i])
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            fresh = seq.context_len == seq.query_len
            past = torch.zeros(CONV - 1, HIDDEN) if fresh else conv_all[slot]
            s = torch.zeros(STATE, STATE) if fresh else ssm_all[slot]
            inputs = torch.cat([past, x[rows].float()])
            u = sum(self.conv[j] * inputs[j:j + seq.query_len] for j in range(CONV))
            q, k, v = self.qkv(F.silu(u)).chunk(3, dim=-1)
            ys = []
            for t in range(seq.query_len):
                s = self.decay[:, None] * s + torch.outer(k[t], v[t])
                ys.append(q[t] @ s)
            conv_all[slot] = inputs[-(CONV - 1):]
            ssm_all[slot] = s
            out[rows] = self.out(torch.stack(ys)).to(x.dtype)
        return out


class Attention(nn.Module):
    def __init__(self, layer: int, window: int | None) -> None:
        super().__init__()
        self.layer, self.window = layer, window
        self.qkv = nn.Linear(HIDDEN, 3 * HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv(x).view(-1, 3 * HEADS, HEAD_DIM).chunk(3, dim=1)
        return self.o(paged_attention(self.layer, q, k, v, ctx, window=self.window).flatten(1))


class Latent(nn.Module):
    """Caches one ``LATENT`` vector a token (K only); keys and values are expanded from it."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.down = nn.Linear(HIDDEN, LATENT, bias=False)
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.up = nn.Linear(LATENT, 2 * HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        cache = ctx.k_caches[self.layer]
        assert ctx.v_caches[self.layer].numel() == 0, "a latent layer has no V cache"
        slots, sequences = ctx.paged(self.layer)
        cache.view(-1, 1, LATENT).index_copy_(0, slots, self.down(x).unsqueeze(1).to(cache.dtype))
        q = self.q(x).view(-1, HEADS, HEAD_DIM)
        out = torch.empty_like(q)
        for seq in sequences:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            c = cache.index_select(0, seq.block_table).view(-1, LATENT)[: seq.context_len]
            k, v = self.up(c.to(x.dtype)).view(-1, 2 * HEADS, HEAD_DIM).chunk(2, dim=1)
            start = seq.context_len - seq.query_len
            mask = torch.arange(seq.context_len)[None, :] <= torch.arange(start, seq.context_len)[:, None]
            out[rows] = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask).transpose(0, 1)
        return self.o(out.flatten(1))


class TinyRecurrentLM(nn.Module):
    def __init__(self, args: ModelArgs, kinds: tuple[str, ...] = KINDS) -> None:
        super().__init__()
        self.embed = nn.Embedding(args.vocab_size, HIDDEN)
        layers: list[nn.Module] = []
        for i, kind in enumerate(kinds):
            if kind == "recurrent":
                layers.append(Recurrent(i))
            elif kind == "latent":
                layers.append(Latent(i))
            else:
                layers.append(Attention(i, WINDOW if kind == "window" else None))
        self.layers = nn.ModuleList(layers)
        self.norms = nn.ModuleList(nn.RMSNorm(HIDDEN) for _ in kinds)
        self.head = nn.Linear(HIDDEN, args.vocab_size, bias=False)
        self.cache_layout = layout(kinds)  # what ModelRunner reads (a family would declare it)
        self.fast_paths = FastPaths(cpu_decoder=True, paged_kernels=True, cuda_graphs=True)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = self.embed(ids)
        for norm, layer in zip(self.norms, self.layers):
            x = x + layer(norm(x), ctx)
        return self.head(x[ctx.logits_indices]).float()


def tiny_recurrent_model(seed: int = 0, kinds: tuple[str, ...] = KINDS) -> TinyRecurrentLM:
    torch.manual_seed(seed)
    model = TinyRecurrentLM(tiny_recurrent_args(), kinds).eval()
    with torch.no_grad():
        model.head.weight.mul_(8)  # sharper logits: greedy choices are not near-ties
    return model


def tiny_recurrent_engine(kinds: tuple[str, ...] = KINDS, **overrides) -> Engine:  # noqa: ANN003
    cfg = dict(context_length=256, block_size=4, max_num_seqs=4, max_num_batched_tokens=64,
               state_checkpoint_interval=16)
    cfg.update(overrides)
    return torch_engine(tiny_recurrent_model(kinds=kinds), tiny_recurrent_args(), ByteTokenizer(),
                        EngineConfig(**cfg))
