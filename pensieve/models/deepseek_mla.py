"""Multi-head latent attention (MLA, DeepSeek-V2/V3 and GLM-4.7-Flash) over the engine's paged
cache, the decoder block that carries it, and what the MLA families share (config keys, GGUF
names, expected weights, the latent cache layout).

Reads like the reference: rotary → attention → layer → model, then the shared tables.

Per token the cache keeps one vector: the normalised KV latent (``kv_lora_rank``) followed by
the rotated shared rotary key (``qk_rope_head_dim``) — ``PagedKV(1, rank + rope, 0)``. A cold
prefill chunk expands the context's latents into per-head keys and values through ``kv_b_proj``
and attends as the reference does; a decode step, and a chunk short against its cached context
(a follow-up turn's new tokens), attends in latent space with the absorbed projections:
``q_nope · W_UK`` gives a query over the latent, the attention-weighted latent goes through
``W_UV`` — the same numbers up to float rounding, without expanding the context. On CUDA a
step's decode rows and short chunks attend in one batched kernel launch
(``FastPaths.cuda_latent_attention``, ``backends/cuda_mla.py``). ``kv_b_proj`` is held per
head, ``[heads, nope + v, rank]``; an HF checkpoint's 2-D ``[heads · (nope + v), rank]`` is
reshaped on load, a llama.cpp file's ``attn_k_b`` (stored transposed) and ``attn_v_b`` are
joined into it (``PACKED``).

The latent norms use eps 1e-6 as the reference modules do (their RMSNorm default), the model's
``rms_norm_eps`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from pensieve.models.args import MLAArgs, ModelArgs, MoEArgs
from pensieve.models.cache_spec import LayerCache, PagedKV
from pensieve.models.config import gguf_args, gguf_rope_scaling, hf_args, hf_rope
from pensieve.models.family import (
    NEXTN_NAMES, FastPaths, GGUFSource, ModelConfigError, Shapes,
)
from pensieve.models.forward_context import (
    ForwardContext, SequenceSlice, gather_context, sequence_mask,
)
from pensieve.models.llama import MLP, CosSin, LlamaBody, RMSNorm
from pensieve.models.moe import (
    EXPERT_PACKED, MOE_GGUF_NAMES, GLMMoE, gguf_moe, hf_int, moe_shapes, shared_gguf_names,
)
from pensieve.models.rope import apply_rope, yarn_mscale

LATENT_EPS = 1e-6  # the reference's q_a_layernorm / kv_a_layernorm


def rotate_pairs(x: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3)…, written de-interleaved (the even dims'
    results, then the odd dims'), as the reference's ``apply_rotary_pos_emb_interleave``."""
    cos, sin = cos_sin
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


class LatentUp(nn.Module):
    """``kv_b_proj``: the latent → each head's no-RoPE key and value, ``weight``
    ``[heads, nope + v, rank]``; a 2-D checkpoint tensor is reshaped on load."""

    def __init__(self, heads: int, rows: int, rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, rows, rank))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN202
        w = state_dict.get(prefix + "weight")
        if w is not None and w.ndim == 2:
            state_dict[prefix + "weight"] = w.reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MLAttention(nn.Module):
    """``absorb``: "auto" (latent-space attention where it reads less: one-token steps and
    chunks short against their cached context, e.g. a follow-up turn's few new tokens over a long
    prefix — expanding every cached latent through ``kv_b`` would cost the whole context;
    expanded K/V for cold prefills), "always" or "never" (for tests)."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        mla = args.mla
        assert mla is not None
        self.layer, self.mla, self.heads = layer, mla, args.num_heads
        h, bias = args.hidden_size, args.attention_bias
        self.qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:
            self.q_a_proj = nn.Linear(h, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, self.heads * self.qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, self.heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_EPS)
        self.kv_b_proj = LatentUp(self.heads, mla.qk_nope_head_dim + mla.v_head_dim,
                                  mla.kv_lora_rank)
        self.o_proj = nn.Linear(self.heads * mla.v_head_dim, h, bias=bias)
        self.absorb = "auto"
        # a backend's one-launch norm + RoPE + cache write (``cuda_hybrid_mla_rope``)
        self.rope_write: Any = None
        # a chunk of n new tokens goes through the latent when 2·n·(rank + rope), its attention's
        # extra width a token, is at most what expanding one cached token costs, rank·(nope + v)
        self._absorb_rows = max(1, mla.kv_lora_rank * (mla.qk_nope_head_dim + mla.v_head_dim)
                                // (2 * (mla.kv_lora_rank + mla.qk_rope_head_dim)))

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        mla, t = self.mla, x.shape[0]
        if mla.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(t, self.heads, self.qk_dim).split(
            [mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        cache = ctx.k_caches[self.layer]
        slot_mapping, sequences = ctx.paged(self.layer)
        # one launch: the latent's norm, both RoPEs, the cache write (cuda_hybrid_mla_rope);
        # None where it declines (a cache or tensors it does not take)
        q_rot = None if self.rope_write is None else self.rope_write(
            q_pe, kv, cos_sin, cache, slot_mapping)
        if q_rot is not None:
            q_pe = q_rot
        else:
            latent, k_pe = kv.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
            latent = self.kv_a_layernorm(latent)
            k_pe = k_pe.unsqueeze(1)
            if mla.rope_interleave:
                q_pe, k_pe = rotate_pairs(q_pe, cos_sin), rotate_pairs(k_pe, cos_sin)
            else:
                q_pe, k_pe = apply_rope(q_pe, k_pe, cos_sin)
            entries = torch.cat((latent, k_pe[:, 0]), dim=-1)
            cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, entries.to(cache.dtype))
        out = x.new_empty(t, self.heads, mla.v_head_dim)
        served = self._batched(q_nope, q_pe, cache, ctx, out)
        for i, seq in enumerate(sequences):
            if i in served:
                continue
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            context = gather_context(cache, seq)[:, 0].to(x.dtype)  # [C, rank + rope]
            latent_path = self.absorb == "always" or (self.absorb == "auto" and (
                seq.query_len == 1 or (seq.query_len <= self._absorb_rows
                                       and seq.context_len >= 2 * seq.query_len)))
            attend = self._absorbed if latent_path else self._expanded
            out[rows] = attend(q_nope[rows], q_pe[rows], context, seq)
        return self.o_proj(out.reshape(t, self.heads * mla.v_head_dim))

    def _batched(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                 ctx: ForwardContext, out: torch.Tensor) -> frozenset[int]:
        """The rows the step's backend attends in latent space in one launch (a backend with
        ``latent_rows``/``attend_latent``, ``backends/cuda_mla.py``, given only to a model that
        declared ``FastPaths.cuda_latent_attention``): their ``out``; returns the sequences
        served (indices into ``ctx.paged(layer)``'s; none where the backend declines)."""
        backend = ctx.attention
        ask = getattr(backend, "latent_rows", None)
        found = ask(self.layer) if ask is not None and self.absorb != "never" else None
        if found is None:
            return frozenset()
        served, rows = found
        q = self._latent_query(q_nope[rows], q_pe[rows])
        o_latent = backend.attend_latent(self.layer, q, cache, self.mla.kv_lora_rank,
                                         self.mla.softmax_scale)
        if o_latent is None:  # a latent wider than the kernel takes
            return frozenset()
        out[rows] = self._latent_out(o_latent)
        return served

    def _latent_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[n, H, nope], [n, H, rope] → [n, H, rank + rope]: ``W_UK`` folded into the query."""
        w_uk = self.kv_b_proj.weight[:, : self.mla.qk_nope_head_dim]
        return torch.cat((torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe), dim=-1)

    def _latent_out(self, o_latent: torch.Tensor) -> torch.Tensor:
        """[n, H, rank] attention-weighted latents → [n, H, v] through ``W_UV``."""
        w_uv = self.kv_b_proj.weight[:, self.mla.qk_nope_head_dim:]
        return torch.einsum("thr,hvr->thv", o_latent, w_uv)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SequenceSlice
              ) -> torch.Tensor:
        """[n, Hq, D] over [C, Hk, D] / [C, Hk, Dv] → [n, Hq, Dv], causal, the model's scale."""
        mask = sequence_mask(seq, q.device, q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=mask,
            is_causal=mask is None and seq.query_len > 1, scale=self.mla.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor,
                  seq: SequenceSlice) -> torch.Tensor:
        """The reference's way: every context token's latent → per-head keys and values."""
        mla = self.mla
        latent, k_pe = context.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        w = self.kv_b_proj.weight
        kv = F.linear(latent, w.reshape(-1, w.shape[-1])).view(latent.shape[0], self.heads, -1)
        k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, self.heads, -1)), dim=-1)
        return self._sdpa(torch.cat((q_nope, q_pe), dim=-1), k, v, seq)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor,
                  seq: SequenceSlice) -> torch.Tensor:
        """Attention in latent space: one shared "head" of latent + rotary key, the values the
        latents themselves; ``W_UK`` folded into the query, ``W_UV`` applied after."""
        mla, (n, heads) = self.mla, q_nope.shape[:2]
        # one shared key "head": every (head, token) query is a row of one single-head attention
        q = self._latent_query(q_nope, q_pe).transpose(0, 1).reshape(1, 1, heads * n, -1)
        mask = None
        if n > 1:
            rows = torch.arange(n, device=q.device).unsqueeze(1) + seq.context_len - n
            cols = torch.arange(seq.context_len, device=q.device).unsqueeze(0)
            mask = torch.zeros(n, seq.context_len, dtype=q.dtype, device=q.device).masked_fill_(
                cols > rows, float("-inf")).repeat(heads, 1)
        o_latent = F.scaled_dot_product_attention(
            q, context[None, None], context[None, None, :, : mla.kv_lora_rank], attn_mask=mask,
            scale=mla.softmax_scale)
        return self._latent_out(o_latent.view(heads, n, -1).transpose(0, 1))


class MLADecoderLayer(nn.Module):
    """Latent attention, then a dense MLP (``MoEArgs.dense_layers``) or DeepSeek-V3 MoE."""

    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = MLAttention(args, layer)
        self.mlp = MLP(args) if layer in args.moe.dense_layers else GLMMoE(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class MLAForCausalLM(nn.Module):
    PACKED: Mapping[str, tuple[str, ...]] = {
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        **EXPERT_PACKED,
        # llama.cpp's split halves ([H, nope, rank] after from_gguf_weight, [H, v, rank])
        "self_attn.kv_b_proj": ("self_attn.k_b", "self_attn.v_b"),
    }

    def __init__(self, args: ModelArgs, max_positions: int | None = None) -> None:
        super().__init__()
        self.args = args
        positions = max_positions or args.max_position_embeddings
        # the body's rotary covers head_dim · partial_rotary_factor = the rotary key's dims
        self.model = LlamaBody(args, positions, MLADecoderLayer)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fast_paths = mla_paths(args, positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos_sin = tuple(t.to(x.dtype) for t in self.model.rotary.lookup(positions))
        return self.lm_head(self.model.run(x, cos_sin, ctx)).float()


# --- what the MLA families share -------------------------------------------------------------

def latent_layout(args: ModelArgs) -> tuple[LayerCache, ...]:
    """One latent + rotary key a token in every layer."""
    return tuple(PagedKV(1, args.head_dim, 0) for _ in range(args.num_layers))


def softmax_scale(qk_dim: int, scaling: Mapping[str, Any] | None) -> float:
    """qk_dim^-½, times YaRN's ``mscale(factor, mscale_all_dim)²`` where configured."""
    scale = qk_dim ** -0.5
    if scaling and scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


def _latent_dims(mla: MLAArgs) -> dict[str, Any]:
    """The cache's one "head" as ``ModelArgs`` sees it; RoPE over its last ``rope`` dims."""
    head = mla.kv_lora_rank + mla.qk_rope_head_dim
    return dict(num_kv_heads=1, head_dim=head, partial_rotary_factor=mla.qk_rope_head_dim / head)


def hf_mla_args(config: Mapping[str, Any], architecture: str, dense: frozenset[int]) -> ModelArgs:
    """ModelArgs of a DeepSeek-V3-shaped config.json (``dense``: the plain-MLP layers)."""
    theta, scaling = hf_rope(config.get("rope_parameters") or config.get("rope_scaling"),
                             float(config.get("rope_theta") or 10000.0))
    nope, rope = hf_int(config, "qk_nope_head_dim"), hf_int(config, "qk_rope_head_dim")
    q_rank = config.get("q_lora_rank")
    mla = MLAArgs(q_lora_rank=int(q_rank) if q_rank else None,
                  kv_lora_rank=hf_int(config, "kv_lora_rank"), qk_nope_head_dim=nope,
                  qk_rope_head_dim=rope, v_head_dim=hf_int(config, "v_head_dim"),
                  softmax_scale=softmax_scale(nope + rope, scaling),
                  rope_interleave=bool(config.get("rope_interleave", True)))
    size = hf_int(config, "moe_intermediate_size")
    if config.get("scoring_func", "sigmoid") != "sigmoid":
        raise ModelConfigError("only sigmoid expert scoring (DeepSeek-V3) is supported")
    moe = MoEArgs(
        num_experts=hf_int(config, "n_routed_experts"), top_k=hf_int(config, "num_experts_per_tok"),
        expert_size=size, gating="sigmoid", norm_topk=bool(config.get("norm_topk_prob", True)),
        scale=float(config.get("routed_scaling_factor", 1.0)),
        n_group=int(config.get("n_group") or 1), topk_group=int(config.get("topk_group") or 1),
        correction_bias=True, shared_size=size * int(config.get("n_shared_experts") or 0),
        dense_layers=dense)
    return hf_args({**config, "rope_parameters": None, "rope_scaling": None}, architecture,
                   rope_theta=theta, rope_scaling=scaling, mla=mla, moe=moe,
                   rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), **_latent_dims(mla))


def gguf_mla_args(src: GGUFSource, architecture: str) -> ModelArgs:
    """ModelArgs of llama.cpp's ``deepseek2`` metadata: ``key_length`` is the latent + rotary
    width (MQA with one head), ``key_length_mla`` / ``value_length_mla`` the per-head dims
    (older files: ``key_length`` / ``value_length`` with an unsplit ``attn_kv_b``)."""
    rope = int(src.key("rope.dimension_count"))
    split = "blk.0.attn_k_b.weight" in src.shapes
    k_len = src.key("attention.key_length_mla", None) if split else None
    v_len = src.key("attention.value_length_mla", None) if split else None
    k_len = int(k_len or src.key("attention.key_length"))
    v_len = int(v_len or src.key("attention.value_length"))
    layers = int(src.key("block_count")) - int(src.key("nextn_predict_layers", 0) or 0)
    scaling = gguf_rope_scaling(src)
    log_mul = src.key("rope.scaling.yarn_log_multiplier", None)
    if scaling and log_mul:  # the converter wrote 0.1 · mscale_all_dim; llama.cpp: mscale = it
        scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul) / 0.1
    q_rank = src.key("attention.q_lora_rank", None)
    mla = MLAArgs(q_lora_rank=int(q_rank) if q_rank else None,
                  kv_lora_rank=int(src.key("attention.kv_lora_rank")),
                  qk_nope_head_dim=k_len - rope, qk_rope_head_dim=rope, v_head_dim=v_len,
                  softmax_scale=softmax_scale(k_len, scaling), split_kv_b=split)
    gating = src.key("expert_gating_func", None)
    vocab = src.shapes["token_embd.weight"][0] if "token_embd.weight" in src.shapes else 0
    if gating is None and not (layers in (47, 48) and vocab == 154880):  # llama.cpp: GLM-4.7-Flash
        raise ModelConfigError("deepseek2 files without sigmoid expert gating (DeepSeek-V2) "
                               "are not supported")
    if gating is not None and int(gating) != 2:
        raise ModelConfigError("only sigmoid expert gating (DeepSeek-V3) is supported")
    moe = gguf_moe(src, gating="sigmoid",
                   correction_bias=any(n.endswith(".exp_probs_b.bias") for n in src.shapes))
    return gguf_args(src, architecture, num_layers=layers, rope_scaling=scaling, mla=mla,
                     moe=moe, attention_bias="blk.0.attn_kv_a_mqa.bias" in src.shapes,
                     rms_norm_eps=float(src.key("attention.layer_norm_rms_epsilon", 1e-6)),
                     **_latent_dims(mla))


def mla_shapes(args: ModelArgs) -> Shapes:
    """Every weight in HF names (``kv_b_proj`` 2-D, or llama.cpp's ``k_b``/``v_b`` halves)."""
    mla, h, heads = args.mla, args.hidden_size, args.num_heads
    shapes = {n: s for n, s in moe_shapes(args, shared="shared_experts").items()
              if ".self_attn." not in n}
    qk, rank = mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla.kv_lora_rank
    for i in range(args.num_layers):
        p = f"model.layers.{i}.self_attn."
        if mla.q_lora_rank:
            shapes.update({p + "q_a_proj.weight": (mla.q_lora_rank, h),
                           p + "q_a_layernorm.weight": (mla.q_lora_rank,),
                           p + "q_b_proj.weight": (heads * qk, mla.q_lora_rank)})
        else:
            shapes[p + "q_proj.weight"] = (heads * qk, h)
        shapes.update({p + "kv_a_proj_with_mqa.weight": (rank + mla.qk_rope_head_dim, h),
                       p + "kv_a_layernorm.weight": (rank,),
                       p + "o_proj.weight": (h, heads * mla.v_head_dim)})
        if mla.split_kv_b:
            shapes[p + "k_b.weight"] = (heads, rank, mla.qk_nope_head_dim)
            shapes[p + "v_b.weight"] = (heads, mla.v_head_dim, rank)
        else:
            shapes[p + "kv_b_proj.weight"] = (heads * (mla.qk_nope_head_dim + mla.v_head_dim), rank)
        if args.attention_bias:
            shapes[p + "kv_a_proj_with_mqa.bias"] = (rank + mla.qk_rope_head_dim,)
            shapes[p + "o_proj.bias"] = (h,)
            if mla.q_lora_rank:
                shapes[p + "q_a_proj.bias"] = (mla.q_lora_rank,)
    return shapes


def from_gguf_weight(name: str, w: torch.Tensor) -> torch.Tensor:
    """llama.cpp stores ``attn_k_b`` transposed ([H, rank, nope]); ours is [H, nope, rank]."""
    return w.transpose(-1, -2).contiguous() if name.endswith("self_attn.k_b.weight") else w


def mla_paths(args: ModelArgs, context_length: int) -> FastPaths:
    """None of the uniform paths (the compiled kernels attend over per-head K/V); a GGUF's
    experts stay codes on the CPU kernels (the MoE is ``models.moe``'s); on CUDA the batched
    latent kernel computes ``MLAttention._absorbed`` for a step's decode rows and short chunks,
    and SiLU blocks take the fused add + norm kernels (``cuda_fused_layers``: each residual add
    with the next norm, the routed picks' sum and the shared expert's add inside it)."""
    return FastPaths(cpu_moe_codes=True, cuda_latent_attention=True,
                     cuda_fused_layers=args.hidden_act == "silu")


DEEPSEEK2_NAMES = {
    **MOE_GGUF_NAMES, **shared_gguf_names("shared_experts"), **NEXTN_NAMES,
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj", "attn_k_b": "self_attn.k_b", "attn_v_b": "self_attn.v_b",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
}
