"""GGUF loading: round trips per tensor type, Q/K un-permutation, metadata, damaged files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from tests.unit.loader_fixtures import (Q, TinyLlama, llamacpp_permute, random_block_bytes,
                             tiny_bpe_tokenizer, write_tiny_gguf)

from pensieve.loaders.checkpoint import CheckpointError
from pensieve.loaders.gguf import load_gguf, model_name, unpermute_rows
from pensieve.models.llama import FAMILY as LLAMA

hf_name = LLAMA.gguf_names.hf_name
from pensieve.loaders.gguf_file import GGUFFile
from pensieve.loaders.registry import load_checkpoint


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> TinyLlama:
    return TinyLlama(vocab=tok.get_vocab_size())


# max |error| allowed relative to the tensor's max |value|: one quant step, which is
# max/8 for Q4_0 (the +max end clips to 7·d), (max-min)/15/2 for Q4_1, half that for 5-bit
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2,
             Q.Q5_0: 0.07, Q.Q5_1: 0.05, Q.Q4_0: 0.13, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_round_trip_within_quant_tolerance(tmp_path, model, tok, qtype):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, qtype=qtype, tokenizer=tok)
    ck = load_checkpoint(path)
    assert set(ck.weights) == set(model.weights)
    for name, src in model.weights.items():
        got = ck.weights[name]
        assert got.shape == src.shape and got.dtype == torch.float32, name
        err = (got - src).abs().max().item()
        assert err <= TOLERANCE[qtype if src.ndim == 2 else Q.F32] * src.abs().max().item() + 1e-7, \
            f"{name}: error {err}"


def test_quantised_weights_equal_gguf_reference(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, qtype=Q.Q4_0, tokenizer=tok)
    gf = GGUFFile(path)
    ck = load_gguf(path)
    info = gf.tensors["blk.1.ffn_up.weight"]
    ref = gguf_dequantize(gf.raw("blk.1.ffn_up.weight").numpy().reshape(info.shape[0], -1), Q.Q4_0)
    assert torch.equal(ck.weights["model.layers.1.mlp.up_proj.weight"], torch.from_numpy(ref))


def test_qk_rows_come_back_in_hf_order(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, qtype=Q.F32, tokenizer=tok)
    ck = load_gguf(path)
    for layer in range(model.layers):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert torch.equal(ck.weights[name], model.weights[name]), name
    # and the file really held them permuted (else this test proves nothing)
    stored = GGUFFile(path).raw("blk.0.attn_q.weight").view(torch.float32).reshape(64, 64)
    assert not torch.equal(stored, model.weights["model.layers.0.self_attn.q_proj.weight"])


def test_unpermute_inverts_llamacpp_permute():
    w = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)
    assert torch.equal(unpermute_rows(llamacpp_permute(w, 8), 8), w)
    bias = torch.arange(2 * 16, dtype=torch.float32)
    assert torch.equal(unpermute_rows(llamacpp_permute(bias, 2), 2), bias)
    with pytest.raises(CheckpointError, match="un-permute"):
        unpermute_rows(torch.zeros(10, 4), 3)


def test_bfloat16_dtype(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, qtype=Q.Q8_0, tokenizer=tok)
    ck = load_checkpoint(path, dtype=torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for w in ck.weights.values())


@pytest.mark.parametrize("ktype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K], ids=lambda q: q.name)
def test_k_quant_tensors_dequantise_like_gguf(tmp_path, model, tok, ktype):
    rows, cols = model.hidden, model.intermediate  # ffn_down: one 256-block per row
    data = random_block_bytes(ktype, rows * cols // 256, seed=3)
    path = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer=tok,
                           raw_tensors={"blk.0.ffn_down.weight": (data, ktype)})
    got = load_gguf(path).weights["model.layers.0.mlp.down_proj.weight"]
    ref = torch.from_numpy(gguf_dequantize(data.reshape(rows, -1), ktype))
    assert got.shape == (rows, cols)
    assert torch.isfinite(got).all() and got.abs().max() > 0
    assert torch.equal(got, ref)


def test_unsupported_quant_type_is_named(tmp_path, model, tok):
    rows, cols = model.hidden, model.intermediate
    data = random_block_bytes(Q.IQ2_XXS, rows * cols // 256)
    path = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer=tok,
                           raw_tensors={"blk.0.ffn_down.weight": (data, Q.IQ2_XXS)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_down\.weight.*IQ2_XXS"):
        load_checkpoint(path)


def test_unsupported_architecture(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer=tok, arch="gpt-neox")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt-neox'.*llama"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.05, 0.001, 20 / 1e9])
def test_truncated_file_is_a_checkpoint_error(tmp_path, model, tok, keep):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, qtype=Q.Q8_0, tokenizer=tok)
    data = path.read_bytes()
    path.write_bytes(data[:max(8, int(len(data) * keep))])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_garbage_and_empty_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF"):
        load_checkpoint(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(empty)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(64))
    with pytest.raises(CheckpointError, match="version 1"):
        load_checkpoint(v1)


def test_metadata_to_model_args(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "Tiny-Model-Q8_0.gguf", model, qtype=Q.Q8_0, tokenizer=tok,
                           extra_kv={"llama.rope.scaling.type": "yarn",
                                     "llama.rope.scaling.factor": 4.0,
                                     "llama.rope.scaling.original_context_length": 128})
    ck = load_checkpoint(path)
    a = ck.args
    assert (a.architecture, a.num_layers, a.hidden_size, a.intermediate_size) == ("llama", 2, 64, 256)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size) == (4, 2, 16, model.vocab)
    assert a.rope_theta == 50000.0 and a.rms_norm_eps == pytest.approx(1e-6)
    assert a.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                              "original_max_position_embeddings": 128}
    assert a.max_position_embeddings == 512 == ck.context_length
    assert a.tie_word_embeddings and "lm_head.weight" not in ck.weights
    assert ck.name == "Tiny-Model"
    assert ck.chat_template.startswith("{% for m in messages %}")
    assert ck.tokenizer.encode("<|im_end|>") == [2]


def test_untied_output_becomes_lm_head(tmp_path, tok):
    model = TinyLlama(vocab=tok.get_vocab_size(), tied=False, layers=1)
    ck = load_checkpoint(write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer=tok))
    assert not ck.args.tie_word_embeddings
    assert torch.equal(ck.weights["lm_head.weight"], model.weights["lm_head.weight"])


def test_missing_metadata_key_is_named(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer=tok)
    data = path.read_bytes().replace(b"llama.block_count", b"llama.block_cxunt")
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="llama.block_count"):
        load_checkpoint(path)


def test_rename_table():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None


def test_model_name_strips_quant_suffix():
    assert model_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"
    assert model_name(Path("Llama-3.2-1B-Instruct-Q4_K_M.gguf")) == "Llama-3.2-1B-Instruct"
    assert model_name(Path("phi.F16.gguf")) == "phi"
    assert model_name(Path("plain.gguf")) == "plain"


def test_reader_matches_gguf_reader(tmp_path, model, tok):
    from gguf import GGUFReader

    path = write_tiny_gguf(tmp_path / "m.gguf", model, qtype=Q.Q4_1, tokenizer=tok)
    ours, ref = GGUFFile(path), GGUFReader(str(path))
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(x) for x in reversed(t.shape))
        assert np.array_equal(ours.raw(t.name).numpy(), t.data.reshape(-1).view(np.uint8))
    assert ours.metadata["tokenizer.ggml.merges"] == ref.fields["tokenizer.ggml.merges"].contents()


def test_cut_inside_the_vocab_and_bad_utf8(tmp_path, model, tok):
    path = write_tiny_gguf(tmp_path / "m.gguf", model, tokenizer=tok)
    data = path.read_bytes()
    cut = data.index(b"tokenizer.ggml.tokens") + 200
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated.*tokenizer.ggml.tokens"):
        load_checkpoint(path)
    path.write_bytes(data.replace(b"<|endoftext|>", b"\xff" * 13))
    with pytest.raises(CheckpointError, match="invalid UTF-8"):
        load_checkpoint(path)
