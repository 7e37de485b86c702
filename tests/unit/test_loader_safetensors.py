"""Hugging Face folders: config.json → ModelArgs, (sharded) safetensors → weights, tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.registry import load_checkpoint
from pensieve.loaders.safetensors import read_chat_template
from pensieve.models.config import hf_args as hf_model_args
from pensieve.models.family import ModelConfigError
from tests.unit.loader_fixtures import tiny_bpe_tokenizer

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def save_tiny_llama(folder, *, tied=False, shard=None, **config_kw):
    """A random 2-layer LlamaForCausalLM saved with save_pretrained, plus a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **config_kw,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    return folder, save_tiny_llama(folder)


def test_weights_equal_the_saved_model(saved):
    folder, model = saved
    ck = load_checkpoint(folder)
    state = model.state_dict()
    assert set(ck.weights) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ck.weights[name], tensor), name
    assert ck.name == "tiny-llama" and ck.chat_template == TEMPLATE
    assert ck.context_length == 256


def test_model_args_from_config(saved):
    folder, model = saved
    a = load_checkpoint(folder).args
    assert (a.architecture, a.vocab_size, a.hidden_size, a.intermediate_size) == \
        ("llama", model.config.vocab_size, 64, 96)
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.head_dim) == (2, 4, 2, 16)
    assert a.rms_norm_eps == 1e-5 and a.rope_theta == 10000.0 and a.rope_scaling is None
    assert not a.tie_word_embeddings and not a.attention_bias and not a.mlp_bias


def test_dtype_cast_and_tokenizer(saved):
    folder, _ = saved
    ck = load_checkpoint(folder, dtype=torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in ck.weights.values())
    assert ck.tokenizer.encode("<|im_start|>") == [1]
    assert ck.tokenizer.eos_token_ids >= {2}


def test_sharded_and_tied(tmp_path):
    folder = tmp_path / "sharded"
    model = save_tiny_llama(folder, tied=True, shard="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    ck = load_checkpoint(folder)
    assert ck.args.tie_word_embeddings and "lm_head.weight" not in ck.weights
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(ck.weights[name], tensor), name


def test_rope_config_shapes():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    v5 = hf_model_args({**base, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}, "llama")
    assert v5.rope_theta == 500000.0
    assert v5.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    v4 = hf_model_args({**base, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}},
                       "llama")
    assert v4.rope_theta == 1e6 and v4.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = hf_model_args({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}},
                          "llama")
    assert plain.rope_scaling is None and plain.rope_theta == 5.0
    assert plain.num_kv_heads == 2 and plain.head_dim == 4
    with pytest.raises(ModelConfigError, match="hidden_size"):
        hf_model_args({k: v for k, v in base.items() if k != "hidden_size"}, "llama")


def test_chat_template_sources(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path) == "J"


def test_unsupported_model_type(tmp_path, saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'.*llama"):
        load_checkpoint(other)


def test_damaged_folders(tmp_path, saved):
    folder, _ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(broken)
    data = (folder / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or malformed"):
        load_checkpoint(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed JSON"):
        load_checkpoint(broken)


def test_missing_weight_is_named(tmp_path, saved):
    from safetensors.torch import save_file

    folder, model = saved
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_text((folder / name).read_text())
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 weight.*layers\.1\.mlp\.up_proj"):
        load_checkpoint(partial)
