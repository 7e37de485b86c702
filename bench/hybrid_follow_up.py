"""Follow-up turn of a Claude Code session vs a cold prefill, per hybrid family (tiny random
configs on the CPU, issue 15 item 5's replay): turn 1, a side request, then turn 2's time to
first token, against turn 2 on a fresh engine. Prompts as ``tests/unit/test_hybrid_replay.py``
renders them (the captured request, trimmed); ``--interval`` is the checkpoint interval.

    .venv/bin/python -m bench.hybrid_follow_up [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pensieve.backends.torch_backend import build_model, torch_engine
from pensieve.chat import PromptRenderer
from pensieve.engine.types import SamplingParams
from pensieve.protocol import MessageCreateParams


def ttft(engine, ids: list[int], retain: bool) -> tuple[float, int]:  # noqa: ANN001
    """Seconds to the first token, tokens served from the cache; runs the request out."""
    started, first, cached = time.perf_counter(), None, 0
    engine.add_request(f"r{started}", ids, SamplingParams(max_tokens=2, temperature=0.0,
                                                          ignore_eos=True, retain_prefix=retain))
    while engine.has_work():
        for d in engine.step():
            if first is None and d.token_ids:
                first, cached = time.perf_counter() - started, d.num_cached_tokens
    assert first is not None
    return first, cached


def checkpoints(root: Path):  # noqa: ANN201
    import transformers

    from tests.helpers.tiny_families import VOCAB
    from tests.helpers.tiny_gpt_oss import config as gpt_oss_config
    from tests.helpers.tiny_hybrid import hybrid_config, hybrid_model, save_hybrid_hf
    from tests.unit.test_hybrid_replay import _hf_checkpoint
    from pensieve.loaders.registry import load_checkpoint

    yield "qwen3_5", load_checkpoint(save_hybrid_hf(
        root / "q", hybrid_model(hybrid_config("qwen3_5", max_position_embeddings=8192))))
    yield "gemma3", _hf_checkpoint(root / "g", transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        head_dim=32, sliding_window=32, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]))
    yield "gpt_oss", _hf_checkpoint(root / "o", gpt_oss_config(sliding_window=32, max_position_embeddings=8192))


def main() -> None:
    from tests.unit.test_hybrid_replay import config, turns

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=int, default=512)
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, ckpt in checkpoints(Path(tmp)):
            renderer = PromptRenderer(ckpt.tokenizer, None)
            one, side, two = (renderer.render(MessageCreateParams.model_validate(t)).token_ids
                              for t in turns())

            def engine():  # noqa: ANN202
                cfg = config(state_checkpoint_interval=a.interval)
                return torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)

            cold, warm = [], []
            for _ in range(a.rounds):
                cold.append(ttft(engine(), two, retain=False)[0])
                e = engine()
                ttft(e, one, retain=True)
                ttft(e, side, retain=False)
                t, cached = ttft(e, two, retain=True)
                warm.append(t)
            c, w = statistics.median(cold), statistics.median(warm)
            print(f"{name}: turn 2 {len(two)} tokens, {cached} from the cache; cold TTFT "
                  f"{c * 1e3:.0f} ms, follow-up {w * 1e3:.0f} ms = {100 * w / c:.1f}% of cold")


if __name__ == "__main__":
    main()
