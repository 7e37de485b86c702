"""A tiny model whose tensors mix GGUF types as real files do (Q4_K q/k with a Q6_K v, Q5_0 and
Q8_0 elsewhere, Qwen2-style q/k/v biases): every projection stays on the kernels, the one-call
decoder takes the model, and it gives the module path's tokens and logits."""

from __future__ import annotations

import pytest
import torch

from pensieve.backends.cpu_quant import load_kernels
from pensieve.backends.cpu_quant.codes_linear import F_Q4, F_Q6, CodesLinear
from pensieve.models.args import ModelArgs
from tests.unit.test_cpu_quant_codes import Q, random_tensor

KERNELS = load_kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="CPU kernels cannot build here")

LAYER_TYPES = [  # per layer: q, k, v, o, gate, up, down
    (Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q4_K, Q.Q8_0, Q.Q6_K),
    (Q.Q5_K, Q.Q5_1, Q.IQ4_NL, Q.Q4_0, Q.IQ4_XS, Q.Q4_1, Q.Q5_0),
]
SHAPES = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256),  # (N, K)
          "self_attn.v_proj": (128, 256), "self_attn.o_proj": (256, 256),
          "mlp.gate_proj": (512, 256), "mlp.up_proj": (512, 256), "mlp.down_proj": (256, 512)}
NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def mixed_args() -> ModelArgs:
    return ModelArgs(architecture="qwen2", vocab_size=257, hidden_size=256, intermediate_size=512,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                     max_position_embeddings=512, attention_bias=True, attention_out_bias=False)


def mixed_engine(decoder: bool):
    from pensieve.backends.quantize import int8_lm_head, plan_int4, swap_in
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.int4_codes import quant_groups
    from pensieve.models.registry import model_class
    from tests.helpers.tiny_engine import ByteTokenizer

    args = mixed_args()
    torch.manual_seed(0)
    model = model_class(args)(args).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.bias.normal_(0, 0.5)
    codes, seed = {}, 0
    for i, types in enumerate(LAYER_TYPES):
        for name, qtype in zip(NAMES, types):
            path = f"model.layers.{i}.{name}"
            out, k = SHAPES[name]
            seed += 1
            codes[f"{path}.weight"] = quant_groups(random_tensor(qtype, out, k, seed), qtype, (out, k))
    modules, floats = plan_int4(codes, model.PACKED)
    assert not floats
    swap_in(model, modules)
    int8_lm_head(model)
    cfg = EngineConfig(context_length=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    engine = torch_engine(model, args, ByteTokenizer(), cfg)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, CodesLinear)
    assert model.model.layers[0].self_attn.qkv_proj.formats == [F_Q4, F_Q6]  # Q4_K q/k, Q6_K v
    assert engine.runner.cpu_decoder is not None
    if not decoder:
        engine.runner.cpu_decoder = None
    return engine


def test_mixed_types_decode_in_one_call_with_the_module_path_tokens():
    from pensieve.engine.types import SamplingParams

    outputs, logits = [], []
    for decoder in (True, False):
        engine = mixed_engine(decoder)
        calls, seen = [], []
        if decoder:
            dec = engine.runner.cpu_decoder
            fn = dec._fn
            dec._fn = lambda *a: calls.append(1) or fn(*a)
        run = engine.runner.run
        engine.runner.run = lambda chunks, *c: seen.append(run(chunks, *c)) or seen[-1]
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(["hello there", "a", "the quick brown fox jumps over"]):
            engine.add_request(str(i), list(prompt.encode()), params)
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for d in engine.step():
                tokens.setdefault(d.request_id, []).extend(d.token_ids)
        outputs.append(tokens)
        logits.append(seen)
        assert not decoder or len(calls) > 15
    assert outputs[0] == outputs[1] and all(len(t) == 24 for t in outputs[0].values())
    for a, b in zip(*logits):
        assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-3
