"""bench/make_random_gguf.py's hybrid shapes (bench/random_hybrid_gguf.py): down-scaled
Qwen3.6-35B-A3B (qwen35moe), gpt-oss-20b (gpt-oss) and GLM-4.7-Flash (deepseek2) files load in
Pensieve as their family with the real shape's layer pattern, and the engine decodes greedily
from them to max_tokens (special tokens' output rows are zero)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from bench import make_random_gguf
from pensieve.backends.torch_backend import build_model
from pensieve.engine.config import EngineConfig
from pensieve.loaders.registry import load_checkpoint
from tests.helpers.paged_run import engine_tokens, prompt
from tests.helpers.tiny_families import TOKENIZER, VOCAB
from tests.unit.loader_fixtures import _add_bpe_vocab

PADDED = VOCAB + 37
SMALL = ["--layers", "4", "--hidden", "256", "--experts", "4", "--experts-used", "2",
         "--expert-intermediate", "256", "--intermediate", "512", "--context-length", "4096",
         "--vocab", str(PADDED), "--device", "cpu"]
CASES = {  # arch → (family, what the real shape makes of 4 layers)
    "qwen35moe": ("qwen3_5_moe", ("linear_attention",) * 3 + ("full_attention",)),
    "gpt-oss": ("gpt_oss", ("sliding_attention", "full_attention") * 2),
    "deepseek2": ("glm4_moe_lite", None),
}


@pytest.fixture(scope="module")
def tokenizer_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.gguf"
    w = GGUFWriter(str(path), "llama")
    _add_bpe_vocab(w, TOKENIZER)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", sorted(CASES))
def test_down_scaled_file_loads_and_decodes(arch, tokenizer_gguf, tmp_path):
    out, template = tmp_path / f"{arch}.gguf", tmp_path / "family.jinja"
    template.write_text(f"{{{{ bos_token }}}}[{arch}]{{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}")
    assert make_random_gguf.main([str(out), "--arch", arch, "--tokenizer-from",
                                  str(tokenizer_gguf), "--seed", "3", "--chat-template",
                                  str(template), *SMALL]) == 0
    reader = GGUFReader(str(out))
    # --chat-template replaces the tokenizer source's template: one key, the family's text
    assert [k for k in reader.fields if k == "tokenizer.chat_template"] == ["tokenizer.chat_template"]
    assert reader.fields["tokenizer.chat_template"].contents() == template.read_text()
    types = {t.name: t.tensor_type for t in reader.tensors}
    if arch == "gpt-oss":  # the released mix: MXFP4 experts, Q8_0 matrices, F32 small ones
        assert types["blk.0.ffn_up_exps.weight"] == GGMLQuantizationType.MXFP4
        assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
        assert types["blk.0.attn_sinks.weight"] == GGMLQuantizationType.F32
    else:
        assert types["output.weight"] == GGMLQuantizationType.Q6_K
        assert types["blk.1.ffn_gate_exps.weight"] == GGMLQuantizationType.Q4_K
    ckpt = load_checkpoint(out)
    name, layer_types = CASES[arch]
    args = ckpt.args
    assert (args.architecture, args.num_layers, args.vocab_size) == (name, 4, PADDED)
    assert (args.moe.num_experts, args.moe.top_k) == (4, 2)
    if layer_types is not None:
        assert tuple(args.layer_types) == layer_types
    else:  # GLM-4.7-Flash: latent attention, the first layer dense
        assert (args.mla.kv_lora_rank, args.mla.q_lora_rank) == (512, 768)
        assert args.moe.dense_layers == frozenset({0})
    model = build_model(ckpt, EngineConfig(context_length=256))
    tokens = engine_tokens(model, ckpt, 256, prompt(20, VOCAB), 6)
    assert len(tokens) == 6
    assert not set(tokens) & {0, 1, 2}  # the specials' output rows are zero


@pytest.mark.parametrize("arch, gb", [("qwen35moe", (19, 23)), ("gpt-oss", (11.5, 13.5)),
                                      ("deepseek2", (16, 19.5))])
def test_real_shapes_fit_their_blocks_and_sizes(arch, gb):
    """The full-size files (not written here): every block type divides its rows, and the total
    is the released 4-bit files' (Qwen3.6-35B-A3B Q4_K_M ~21 GB, gpt-oss-20b MXFP4 ~12.8 GB,
    GLM-4.7-Flash Q4_K_M ~18 GB)."""
    from gguf import GGML_QUANT_SIZES

    from bench import random_hybrid_gguf as hybrid

    a = make_random_gguf.build_parser().parse_args(["x.gguf", "--arch", arch])
    hybrid.defaults(a)
    total = 0
    for name, shape, small in hybrid.tensor_specs(a, a.vocab):
        n = 1
        for d in shape:
            n *= d
        qtype = None if small else make_random_gguf.block_type(name, shape, a)
        if qtype is None:
            total += n * (4 if small else 2)
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        assert shape[-1] % block == 0, (name, shape, qtype)
        total += n // block * size
    assert gb[0] < total / 1e9 < gb[1], total / 1e9
