"""Builders for the loader tests: a tiny byte-level BPE vocab, tiny GGUF files, HF folders.

The GGUF writer here plays llama.cpp's converter: it renames HF tensors, permutes Q/K
rows the way ``convert_hf_to_gguf.py`` does, and quantises with ``gguf.quants``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

Q = GGMLQuantizationType
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there; the world says hello",
    "def main():\n    return 42\n",
    "naïve café — 日本語 🤗",
] * 20


def tiny_bpe_tokenizer() -> Tokenizer:
    """A ~400-token byte-level BPE with ChatML specials at ids 0..2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def bpe_tokens_and_merges(tok: Tokenizer) -> tuple[list[str], list[str]]:
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@dataclass
class TinyLlama:
    """HF-order float weights of a 2-layer llama, plus its dims."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256  # a multiple of 256 so ffn_down rows fit K-quant blocks
    layers: int = 2
    vocab: int = 400
    tied: bool = True
    seed: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        hd = self.hidden // self.heads
        shapes = {"model.embed_tokens.weight": (self.vocab, self.hidden),
                  "model.norm.weight": (self.hidden,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (self.hidden,),
                p + "post_attention_layernorm.weight": (self.hidden,),
                p + "self_attn.q_proj.weight": (self.heads * hd, self.hidden),
                p + "self_attn.k_proj.weight": (self.kv_heads * hd, self.hidden),
                p + "self_attn.v_proj.weight": (self.kv_heads * hd, self.hidden),
                p + "self_attn.o_proj.weight": (self.hidden, self.heads * hd),
                p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
            })
        self.weights = {n: torch.randn(s, generator=g) * 0.1 for n, s in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def llamacpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What convert_hf_to_gguf.py does to llama Q/K rows: halves → interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_block_bytes(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random blocks whose float16 scale fields hold small finite values."""
    _, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82),
                Q.Q4_1: (0, 2), Q.Q5_1: (0, 2),
                Q.Q3_K: (108,)}.get(qtype, (0,))
    for at in scale_at:
        scales = rng.uniform(0.001, 0.01, size=n_blocks).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def write_tiny_gguf(
    path: Path,
    model: TinyLlama,
    *,
    qtype: GGMLQuantizationType = Q.F32,
    raw_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
    arch: str = "llama",
    extra_kv: dict[str, Any] | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write ``model`` as a llama.cpp-style GGUF; 2-D weights in ``qtype``.

    ``raw_tensors`` replaces named GGUF tensors with given block bytes (K-quants, which
    ``gguf`` cannot produce).
    """
    w = GGUFWriter(str(path), arch)
    hd = model.hidden // model.heads
    w.add_block_count(model.layers)
    w.add_context_length(512)
    w.add_embedding_length(model.hidden)
    w.add_feed_forward_length(model.intermediate)
    w.add_head_count(model.heads)
    w.add_head_count_kv(model.kv_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(hd)
    for key, value in (extra_kv or {}).items():
        _add_kv(w, key, value)
    _add_bpe_vocab(w, tokenizer or tiny_bpe_tokenizer())
    for hf, tensor in model.weights.items():
        name = gguf_name(hf)
        if raw_tensors and name in raw_tensors:
            data, raw_type = raw_tensors[name]
            w.add_tensor(name, data.reshape(tensor.shape[0], -1), raw_dtype=raw_type)
            continue
        t = tensor
        if ".q_proj." in hf:
            t = llamacpp_permute(t, model.heads)
        elif ".k_proj." in hf:
            t = llamacpp_permute(t, model.kv_heads)
        _add_float_tensor(w, name, t.numpy().astype(np.float32), qtype if t.ndim == 2 else Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_float_tensor(w: GGUFWriter, name: str, a: np.ndarray, qtype: GGMLQuantizationType) -> None:
    if qtype == Q.F32:
        w.add_tensor(name, a)
    elif qtype == Q.F16:
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)


def _add_kv(w: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def _add_bpe_vocab(w: GGUFWriter, tok: Tokenizer) -> None:
    tokens, merges = bpe_tokens_and_merges(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
