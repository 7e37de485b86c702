"""The hybrid families' real shapes for ``bench/make_random_gguf.py``: metadata, tensor list and
block types of a random-weight GGUF as llama.cpp's converter writes each architecture.

* ``qwen35moe`` — Qwen3.6-35B-A3B (the Qwen3.5-35B-A3B body; transformers'
  ``Qwen3_5MoeTextConfig`` defaults, which are that model's config.json): hidden 2048, 40 layers,
  three Gated DeltaNet layers to one gated full-attention layer (``full_attention_interval`` 4),
  attention 16 heads / 2 KV heads of 256 (q_proj doubled for the output gate), RoPE on 64 of the
  256 dims (``partial_rotary_factor`` 0.25, mrope sections 11/11/10, θ 1e7), DeltaNet 16 key heads
  and 32 value heads of 128, conv kernel 4, 256 experts of width 512, top-8, plus a shared expert
  of 512 with its sigmoid gate, vocabulary 248320, untied output.
* ``gpt-oss`` — gpt-oss-20b (OpenAI's config.json; transformers' ``GptOssConfig`` has the 120b
  layer/expert counts): hidden 2880, 24 layers alternating 128-token sliding-window and full
  attention (window on even layers), 64 heads / 8 KV heads of 64 with q/k/v/o biases and a learned
  sink per head, 32 experts of width 2880, top-4, with biases, YaRN ×32 over 4096 (θ 150000),
  vocabulary 201088. Experts MXFP4 and everything else 2-D Q8_0, as ggml-org's released
  ``gpt-oss-20b-mxfp4.gguf`` holds them (norms, sinks, biases and the router F32).
* ``deepseek2`` — GLM-4.7-Flash (transformers' ``Glm4MoeLiteConfig`` defaults = its config.json):
  hidden 2048, 47 layers (the first dense, width 10240), 20 heads of multi-head latent attention
  (q rank 768, KV latent 512, nope 192 + rope 64, v 256), 64 experts of width 1536, top-4, one
  shared expert, sigmoid routing with a correction bias, routed scale 1.8, vocabulary 154880.
  ``kv_b_proj`` written split as llama.cpp does (``attn_k_b`` transposed, ``attn_v_b``), Q8_0 as
  the released Q4_K_M files carry them.

What llama.cpp requires of each (``.gpu/llama.cpp/src/models/{qwen35moe,openai-moe,deepseek2}.cpp``
``load_arch_hparams``/``load_arch_tensors``) is what ``metadata`` and ``tensor_specs`` write; the
tensor names are checked against the family's ``gguf_names`` (Pensieve's one map from llama.cpp's
names), so a name neither loader knows fails at write time. No MTP block is written (both
llama.cpp and Pensieve take a file without one). Under ``q4_k_m`` the matrices follow llama.cpp's
Q4_K_M rule (Q6_K ``attn_v``/``ffn_down*`` on ``use_more_bits`` layers and the output, Q4_K the
rest); a matrix whose rows are not a multiple of 256 falls back to Q8_0.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
import torch
from gguf import ExpertGatingFuncType, GGMLQuantizationType, GGUFWriter, RopeScalingType

Q = GGMLQuantizationType
F32, F16 = "f32", "f16"
Spec = tuple[str, tuple[int, ...], bool]  # (GGUF name, torch-order shape, small F32 tensor)

SHAPES: dict[str, dict[str, float | int]] = {
    "qwen35moe": dict(layers=40, hidden=2048, heads=16, kv_heads=2, head_dim=256,
                      intermediate=0, experts=256, experts_used=8, expert_intermediate=512,
                      shared_intermediate=512, vocab=248320, context_length=262144,
                      rope_theta=1e7, eps=1e-6, rotary=64, lin_k_heads=16, lin_v_heads=32,
                      lin_head_dim=128, conv_kernel=4, full_interval=4),
    "gpt-oss": dict(layers=24, hidden=2880, heads=64, kv_heads=8, head_dim=64, intermediate=0,
                    experts=32, experts_used=4, expert_intermediate=2880, vocab=201088,
                    context_length=131072, rope_theta=150000.0, eps=1e-5, window=128,
                    yarn_factor=32.0, yarn_orig=4096),
    "deepseek2": dict(layers=47, hidden=2048, heads=20, kv_heads=1, head_dim=0,
                      intermediate=10240, experts=64, experts_used=4, expert_intermediate=1536,
                      shared_experts=1, dense_layers=1, vocab=154880, context_length=202752,
                      rope_theta=1e6, eps=1e-5, q_rank=768, kv_rank=512, nope=192, rope=64,
                      v_dim=256, routed_scale=1.8),
}
FAMILIES = {"qwen35moe": "qwen3_5_moe", "gpt-oss": "gpt_oss", "deepseek2": "glm4_moe_lite"}
FILE_TYPES = {"q4_k_m": 15, "f16": 1, "mxfp4": 38}  # LLAMA_FTYPE_MOSTLY_*


def defaults(a: argparse.Namespace) -> None:
    """Fill every option left None with the real shape's value."""
    for key, value in SHAPES[a.arch].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.dtype is None:
        a.dtype = "mxfp4" if a.arch == "gpt-oss" else "q4_k_m"
    if (a.arch == "gpt-oss") != (a.dtype == "mxfp4"):
        raise SystemExit("gpt-oss is written as the released MXFP4 mix (--dtype mxfp4) only; "
                         "qwen35moe/deepseek2 take q4_k_m or f16")


def metadata(w: GGUFWriter, a: argparse.Namespace, vocab: int) -> None:
    w.add_name(f"random-{a.arch}-{a.layers}L-{a.hidden}")
    w.add_block_count(a.layers)
    w.add_context_length(a.context_length)
    w.add_embedding_length(a.hidden)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.eps)
    w.add_expert_count(a.experts)
    w.add_expert_used_count(a.experts_used)
    w.add_expert_feed_forward_length(a.expert_intermediate)
    w.add_vocab_size(vocab)
    w.add_file_type(FILE_TYPES[a.dtype])
    if a.arch == "qwen35moe":  # no feed_forward_length: every layer is sparse
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
        w.add_rope_dimension_count(a.rotary)
        w.add_rope_dimension_sections([11, 11, 10, 0])
        w.add_expert_shared_feed_forward_length(a.shared_intermediate)
        w.add_ssm_conv_kernel(a.conv_kernel)
        w.add_ssm_state_size(a.lin_head_dim)
        w.add_ssm_group_count(a.lin_k_heads)
        w.add_ssm_time_step_rank(a.lin_v_heads)
        w.add_ssm_inner_size(a.lin_head_dim * a.lin_v_heads)
        w.add_full_attention_interval(a.full_interval)
    elif a.arch == "gpt-oss":
        w.add_feed_forward_length(a.expert_intermediate)
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
        w.add_rope_dimension_count(a.head_dim)
        w.add_sliding_window(a.window)
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(a.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(a.yarn_orig)
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
    else:  # deepseek2 (GLM-4.7-Flash): MLA dims as the converter writes them, split k_b/v_b
        w.add_feed_forward_length(a.intermediate)
        w.add_leading_dense_block_count(a.dense_layers)
        w.add_q_lora_rank(a.q_rank)
        w.add_kv_lora_rank(a.kv_rank)
        w.add_key_length(a.kv_rank + a.rope)
        w.add_value_length(a.kv_rank)
        w.add_key_length_mla(a.nope + a.rope)
        w.add_value_length_mla(a.v_dim)
        w.add_rope_dimension_count(a.rope)
        w.add_expert_shared_count(a.shared_experts)
        w.add_expert_weights_scale(a.routed_scale)
        w.add_expert_weights_norm(True)
        w.add_expert_group_count(1)
        w.add_expert_group_used_count(1)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)


def _is_full_attention(a: argparse.Namespace, i: int) -> bool:
    return (i + 1) % a.full_interval == 0


def _layer(a: argparse.Namespace, i: int) -> Iterator[Spec]:
    h, p = a.hidden, f"blk.{i}."
    yield p + "attn_norm.weight", (h,), True
    if a.arch == "qwen35moe":
        yield p + "post_attention_norm.weight", (h,), True
        if _is_full_attention(a, i):
            q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
            yield p + "attn_q.weight", (2 * q, h), False  # query and its output gate
            yield p + "attn_k.weight", (kv, h), False
            yield p + "attn_v.weight", (kv, h), False
            yield p + "attn_q_norm.weight", (a.head_dim,), True
            yield p + "attn_k_norm.weight", (a.head_dim,), True
            yield p + "attn_output.weight", (h, q), False
        else:
            key, value = a.lin_k_heads * a.lin_head_dim, a.lin_v_heads * a.lin_head_dim
            yield p + "attn_qkv.weight", (2 * key + value, h), False
            yield p + "attn_gate.weight", (value, h), False
            yield p + "ssm_conv1d.weight", (2 * key + value, a.conv_kernel), True
            yield p + "ssm_dt.bias", (a.lin_v_heads,), True
            yield p + "ssm_a", (a.lin_v_heads,), True
            yield p + "ssm_beta.weight", (a.lin_v_heads, h), False
            yield p + "ssm_alpha.weight", (a.lin_v_heads, h), False
            yield p + "ssm_norm.weight", (a.lin_head_dim,), True
            yield p + "ssm_out.weight", (h, value), False
        yield from _experts(a, p, bias=False)
        yield p + "ffn_gate_inp_shexp.weight", (1, h), True
        yield from _dense(p, "_shexp", h, a.shared_intermediate)
    elif a.arch == "gpt-oss":
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        yield p + "post_attention_norm.weight", (h,), True
        for name, rows, cols in (("attn_q", q, h), ("attn_k", kv, h), ("attn_v", kv, h),
                                 ("attn_output", h, q)):
            yield p + name + ".weight", (rows, cols), False
            yield p + name + ".bias", (rows,), True
        yield p + "attn_sinks.weight", (a.heads,), True
        yield from _experts(a, p, bias=True)
    else:
        n = a.heads
        yield p + "attn_q_a_norm.weight", (a.q_rank,), True
        yield p + "attn_kv_a_norm.weight", (a.kv_rank,), True
        yield p + "attn_q_a.weight", (a.q_rank, h), False
        yield p + "attn_q_b.weight", (n * (a.nope + a.rope), a.q_rank), False
        yield p + "attn_kv_a_mqa.weight", (a.kv_rank + a.rope, h), False
        yield p + "attn_k_b.weight", (n, a.kv_rank, a.nope), False
        yield p + "attn_v_b.weight", (n, a.v_dim, a.kv_rank), False
        yield p + "attn_output.weight", (h, n * a.v_dim), False
        yield p + "ffn_norm.weight", (h,), True
        if i < a.dense_layers:
            yield from _dense(p, "", h, a.intermediate)
        else:
            yield from _experts(a, p, bias=False)
            yield p + "exp_probs_b.bias", (a.experts,), True
            yield from _dense(p, "_shexp", h, a.expert_intermediate * a.shared_experts)


def _experts(a: argparse.Namespace, p: str, bias: bool) -> Iterator[Spec]:
    e, inner, h = a.experts, a.expert_intermediate, a.hidden
    yield p + "ffn_gate_inp.weight", (e, h), True
    if bias:
        yield p + "ffn_gate_inp.bias", (e,), True
    for name, shape in (("gate", (e, inner, h)), ("up", (e, inner, h)), ("down", (e, h, inner))):
        yield p + f"ffn_{name}_exps.weight", shape, False
        if bias:
            yield p + f"ffn_{name}_exps.bias", shape[:2], True


def _dense(p: str, suffix: str, h: int, inner: int) -> Iterator[Spec]:
    yield p + f"ffn_gate{suffix}.weight", (inner, h), False
    yield p + f"ffn_up{suffix}.weight", (inner, h), False
    yield p + f"ffn_down{suffix}.weight", (h, inner), False


def tensor_specs(a: argparse.Namespace, vocab: int) -> list[Spec]:
    """Every tensor in file order; each name must map through the family's ``gguf_names``."""
    from pensieve.models.registry import family

    h = a.hidden
    specs = [("token_embd.weight", (vocab, h), False)]
    for i in range(a.layers):
        specs += list(_layer(a, i))
    specs += [("output_norm.weight", (h,), True), ("output.weight", (vocab, h), False)]
    names = family(FAMILIES[a.arch]).gguf_names
    unknown = [s[0] for s in specs if names.hf_name(s[0]) is None]
    if unknown:
        raise SystemExit(f"{FAMILIES[a.arch]}'s gguf_names lack {unknown[:4]}")
    return specs


def block_type(name: str, shape: tuple[int, ...], a: argparse.Namespace,
               more_bits: bool) -> Q | str:
    """The type a non-small tensor is written as: a GGML block type, or ``f16``."""
    if a.arch == "gpt-oss":
        return Q.MXFP4 if name.endswith("_exps.weight") else Q.Q8_0
    if a.dtype == "f16":
        return F16
    if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):  # as the released files carry them
        return Q.Q8_0
    if name == "output.weight":
        qtype = Q.Q6_K
    elif name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")) and more_bits:
        qtype = Q.Q6_K
    else:
        qtype = Q.Q4_K
    return qtype if shape[-1] % 256 == 0 else Q.Q8_0


def small_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator,
                 device: str) -> np.ndarray:
    """The F32 tensors: norms one (llama.cpp stores Qwen3.5's (1 + w) with the 1 added), biases
    and the routers ~N(0, 0.02), decays ``ssm_a`` = −A with A in [1, 8] (HF draws A in (0, 16)),
    ``dt`` bias one, conv taps ~N(0, 0.3), sinks ~N(0, 0.5)."""
    def randn(scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).mul_(scale)

    if name.endswith(".ssm_a"):
        t = torch.rand(shape, generator=gen, device=device).mul_(-7).sub_(1)
    elif name.endswith("ssm_conv1d.weight"):
        t = randn(0.3)
    elif name.endswith("attn_sinks.weight"):
        t = randn(0.5)
    elif name.endswith((".bias", "ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")):
        t = randn(0.02) if not name.endswith("ssm_dt.bias") else torch.ones(shape)
    elif name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
        t = randn(0.05).add_(1)
    else:
        t = torch.ones(shape)
    return t.float().cpu().numpy()


def random_q8_0_blocks(shape: tuple[int, ...], gen: torch.Generator, device: str,
                       zero_rows: list[int]) -> np.ndarray:
    """Q8_0 (d f16, 32 int8; w = d·q): uniform codes, d for weights of std ~0.02."""
    rows, nb = int(np.prod(shape[:-1])), shape[-1] // 32
    qs = torch.randint(-127, 128, (rows, nb, 32), generator=gen, device=device, dtype=torch.int8)
    d = torch.full((rows, nb, 1), 0.02 / 73.3, device=device, dtype=torch.float16)
    if zero_rows:
        d[zero_rows] = 0
    return torch.cat([d.view(torch.uint8), qs.view(torch.uint8)], -1).reshape(rows, -1).cpu().numpy()


def random_mxfp4_blocks(shape: tuple[int, ...], gen: torch.Generator, device: str) -> np.ndarray:
    """ggml's MXFP4 (an E8M0 exponent, 16 bytes of E2M1 nibbles; w = e2m1·2^(e−127)): uniform
    codes (rms 2.93) and e = 120 (2^−7): weights of std ~0.023."""
    rows, nb = int(np.prod(shape[:-1])), shape[-1] // 32
    qs = torch.randint(0, 256, (rows, nb, 16), generator=gen, device=device, dtype=torch.uint8)
    e = torch.full((rows, nb, 1), 120, device=device, dtype=torch.uint8)
    return torch.cat([e, qs], -1).reshape(rows, -1).cpu().numpy()
