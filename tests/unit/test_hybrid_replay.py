"""Issue 15 item 5: a Claude Code session replayed on each hybrid family's tiny config (CPU).

The captured Claude Code request (trimmed to a few tools and the system prompt's head, so a CPU
prefill takes seconds), rendered by the real ``PromptRenderer``; turn 2 = turn 1 + the model's
tool call + its result, with a new billing header; a side request (another system prompt, not
retained) runs between the turns. Turn 2 must prefill at most its new tokens plus one checkpoint
interval (``num_prompt_tokens - num_cached_tokens``, what ``cache_read_input_tokens`` reports),
and its tokens must equal a cold engine's. Families: a tiny model with every cache kind
(recurrent, full, windowed, latent), Gemma 3 and Gemma 4 (sliding windows; Gemma 4's shared
K/V layers), gpt-oss (128-token-style windows with sinks, here 32), GLM-4.7-Flash (latent),
Qwen3.5 and Qwen3-Next (Gated DeltaNet state checkpoints).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.backends.torch_backend import build_model, torch_engine  # noqa: E402
from pensieve.chat import PromptRenderer  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from pensieve.protocol import MessageCreateParams  # noqa: E402
from tests.helpers.tiny_engine import ByteTokenizer  # noqa: E402
from tests.helpers.tiny_recurrent import tiny_recurrent_args, tiny_recurrent_model  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "fixtures" / "claude_code_request.json"
INTERVAL, BLOCK = 64, 16
TOOLS = ("Bash", "Read")


def config(**changes: Any) -> EngineConfig:
    return EngineConfig(**{**dict(context_length=8192, block_size=BLOCK, max_num_seqs=2,
                                  max_num_batched_tokens=512, state_checkpoint_interval=INTERVAL),
                           **changes})


def turns() -> tuple[dict, dict, dict]:
    """Turn 1 (trimmed capture), the side request, turn 2 (new billing header, call + result)."""
    turn1 = json.loads(FIXTURE.read_text())
    turn1["system"][2]["text"] = turn1["system"][2]["text"][:400]
    turn1["tools"] = [_trimmed(t) for t in turn1["tools"] if t["name"] in TOOLS]
    turn1["messages"][1]["content"] = turn1["messages"][1]["content"][:200]
    turn1.pop("thinking", None)
    turn2 = copy.deepcopy(turn1)
    turn2["system"][0]["text"] = turn1["system"][0]["text"].replace(".0df;", ".a1c;")
    turn2["messages"] += [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_01AbCdEfGhIjKlMnOpQrStUv", "name": "Bash",
             "input": {"command": "ls -la", "description": "List files"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01AbCdEfGhIjKlMnOpQrStUv",
             "content": "total 0\ndrwxr-xr-x  2 user user 4096 .\n-rw-r--r--  1 user user 12 a.txt"}]},
    ]
    side = {"model": turn1["model"], "max_tokens": 32,
            "system": [{"type": "text", "text": "Summarize this coding conversation in under 50 characters."}],
            "messages": [{"role": "user", "content": "list the files in this folder"}]}
    return turn1, side, turn2


def _trimmed(tool: dict) -> dict:
    """The tool with its descriptions cut short (its schema's shape kept)."""
    schema = copy.deepcopy(tool["input_schema"])
    for prop in schema.get("properties", {}).values():
        if "description" in prop:
            prop["description"] = prop["description"][:40]
    return {**tool, "description": tool["description"][:200], "input_schema": schema}


def run(engine, rid: str, ids: list[int], retain: bool) -> tuple[list[int], Any]:  # noqa: ANN001
    engine.add_request(rid, ids, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                retain_prefix=retain))
    tokens, last = [], None
    while engine.has_work():
        for d in engine.step():
            if d.request_id == rid:
                tokens.extend(d.token_ids)
                last = d
    return tokens, last


def replay(make_engine, renderer: PromptRenderer) -> None:  # noqa: ANN001
    one, side, two = (renderer.render(MessageCreateParams.model_validate(t)).token_ids for t in turns())
    assert two[: len(one)] == one, "turn 2 starts with the whole of turn 1"
    engine = make_engine()
    run(engine, "turn-1", one, retain=True)
    run(engine, "side", side, retain=False)
    tokens, last = run(engine, "turn-2", two, retain=True)
    prefilled = last.num_prompt_tokens - last.num_cached_tokens
    print(f"turn 1 {len(one)} tokens, turn 2 {len(two)}: prefilled {prefilled}, "
          f"cache read {last.num_cached_tokens}")
    assert prefilled <= len(two) - len(one) + INTERVAL
    assert tokens == run(make_engine(), "cold", two, retain=False)[0]


@pytest.mark.slow
def test_replay_tiny_recurrent_hybrid():
    """Recurrent + full + windowed + latent layers: the state resumes from the checkpoint at
    turn 1's last full block."""
    args = tiny_recurrent_args()
    replay(lambda: torch_engine(tiny_recurrent_model(), args, ByteTokenizer(), config()),
           PromptRenderer(ByteTokenizer(), None))


def _hf_checkpoint(tmp_path: Path, hf_config: Any, moe: bool = False, make=None):  # noqa: ANN001, ANN202
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import hf_model, save_hf
    from tests.helpers.tiny_moe import moe_model

    ref = make(hf_config) if make else moe_model(hf_config) if moe else hf_model(hf_config)
    return load_checkpoint(save_hf(tmp_path / "hf", ref))


def _replay_checkpoint(ckpt) -> None:  # noqa: ANN001
    def make():  # noqa: ANN202
        cfg = config()
        return torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)

    replay(make, PromptRenderer(ckpt.tokenizer, None))


@pytest.mark.slow
def test_replay_gemma3_sliding_windows(tmp_path):
    from tests.helpers.tiny_families import VOCAB

    torch.manual_seed(0)
    ckpt = _hf_checkpoint(tmp_path, transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=32, query_pre_attn_scalar=24))
    _replay_checkpoint(ckpt)


@pytest.mark.slow
def test_replay_glm4_moe_lite_latent(tmp_path):
    from tests.helpers.tiny_families import VOCAB

    ckpt = _hf_checkpoint(tmp_path, transformers.Glm4MoeLiteConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        n_group=2, topk_group=1, routed_scaling_factor=1.8, norm_topk_prob=True,
        tie_word_embeddings=False, q_lora_rank=24, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}), moe=True)
    _replay_checkpoint(ckpt)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_next"])
def test_replay_gated_deltanet(tmp_path, name):
    """Qwen3.5 (dense) and Qwen3-Next (MoE): Gated DeltaNet layers resume from the state
    checkpoint at turn 1's last full block, gated attention from its blocks."""
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_hybrid import hybrid_config, hybrid_model, save_hybrid_hf

    model = hybrid_model(hybrid_config(name, max_position_embeddings=8192))
    _replay_checkpoint(load_checkpoint(save_hybrid_hf(tmp_path / "hf", model)))


@pytest.mark.slow
def test_replay_gpt_oss_windows_and_sinks(tmp_path):
    from tests.helpers.tiny_gpt_oss import config as gpt_oss_config, gpt_oss_model

    torch.manual_seed(0)
    ckpt = _hf_checkpoint(tmp_path, gpt_oss_config(sliding_window=32, max_position_embeddings=8192),
                          make=gpt_oss_model)  # sinks and experts drawn as gpt-oss's test draws them
    _replay_checkpoint(ckpt)


@pytest.mark.slow
def test_replay_gemma4_windows_and_shared_kv(tmp_path):
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import save_hf
    from tests.unit.test_gemma4 import config as gemma4_config, reference

    assert gemma4_config("dense").num_kv_shared_layers == 3
    _replay_checkpoint(load_checkpoint(save_hf(tmp_path / "hf", reference("dense"))))
