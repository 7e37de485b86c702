"""Our Llama over the paged KV cache against transformers' LlamaForCausalLM on a tiny random model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.models.args import ModelArgs
from pensieve.models.forward_context import ForwardContext, SequenceSlice
from pensieve.models.llama import LlamaForCausalLM
from pensieve.models.packing import pack_weights

BLOCK = 4


def _tiny(rope_scaling=None, tie=False):
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
        max_position_embeddings=256, tie_word_embeddings=tie, rope_scaling=rope_scaling,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    args = ModelArgs(
        architecture="llama", vocab_size=97, hidden_size=64, intermediate_size=112,
        num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=500.0, rope_scaling=rope_scaling, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    ours = LlamaForCausalLM(args).eval()
    packed = pack_weights(ref.state_dict(), LlamaForCausalLM.PACKED)
    missing, unexpected = ours.load_state_dict(packed, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing) == tie or not missing
    return ref, ours, args


def _kv(args: ModelArgs, num_blocks: int = 64):
    shape = (num_blocks, BLOCK, args.num_kv_heads, args.head_dim)
    return [torch.zeros(shape) for _ in range(args.num_layers)], [
        torch.zeros(shape) for _ in range(args.num_layers)
    ]


def _run(model, ids, start, blocks, kv, all_logits=True):
    """Feed ids[start:] for one sequence whose KV lives in ``blocks``."""
    n = len(ids) - start
    positions = torch.arange(start, len(ids))
    slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, len(ids))])
    seq = SequenceSlice(0, n, len(ids), torch.tensor(blocks))
    rows = torch.arange(n) if all_logits else torch.tensor([n - 1])
    ctx = ForwardContext(kv[0], kv[1], slots, [seq], rows)
    with torch.no_grad():
        return model(torch.tensor(ids[start:]), positions, ctx)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ],
)
def test_prefill_logits_match(rope_scaling):
    ref, ours, args = _tiny(rope_scaling)
    ids = torch.randint(0, 97, (40,)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = _run(ours, ids, 0, [7, 3, 11, 0, 5, 9, 2, 8, 1, 4], _kv(args))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_tied_embeddings():
    ref, ours, args = _tiny(tie=True)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (9,)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_run(ours, ids, 0, [1, 2, 3], _kv(args)), expected, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_then_decode_matches_full_forward():
    ref, ours, args = _tiny()
    ids = torch.randint(0, 97, (23,)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    kv, blocks = _kv(args), [12, 4, 30, 6, 17, 21]
    first = _run(ours, ids[:10], 0, blocks, kv)  # chunk 1: cold
    second = _run(ours, ids[:19], 10, blocks, kv)  # chunk 2: over cached prefix
    decoded = [_run(ours, ids[: i + 1], i, blocks, kv) for i in range(19, 23)]  # decodes
    got = torch.cat([first, second, *decoded])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got[-1], got[-2])
