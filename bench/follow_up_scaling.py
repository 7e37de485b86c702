"""Turn 2's cost as a function of the cached prefix, on the CPU (issue 15's follow-up target):
GLM-4.7-Flash-shaped (MLA + MoE) and gpt-oss-shaped (sinks + sliding window + MoE) random models,
narrowed, over prefixes of a few thousand tokens. Turn 1 (``--prefix`` tokens), then turn 2
(turn 1 + ``--new`` tokens); prints turn 2's time per prefix length and, with ``--profile``,
the top ops of turn 2. A turn 2 that grows with the prefix beyond attention's own reads is
the bug this bench looks for.

    .venv/bin/python -m bench.follow_up_scaling --family glm --prefix 2048 4096 8192

On the GPU, a real-shaped random GGUF (``bench/gpu_hybrid_run.sh`` writes them; ``KEEP=1`` keeps
them), turn 2's step profiled by device time:

    python -m bench.follow_up_scaling --gguf /tmp/hy/glm-4.7-flash-q4_k_m.gguf --device cuda \
        --prefix 20384 --new 64 --profile
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pensieve.backends.torch_backend import build_engine
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import SamplingParams


def glm(tmp: Path) -> Any:
    from tests.helpers.tiny_hybrid_checkpoints import glm_lite

    # GLM-4.7-Flash's proportions (rank 512, rope 64, nope 192, v 256, 20 heads) scaled by 1/4
    return glm_lite(tmp, hidden_size=256, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=16384,
                    kv_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=64,
                    n_routed_experts=8, moe_intermediate_size=64, n_group=1, q_lora_rank=96,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def gpt_oss(tmp: Path) -> Any:
    from pensieve.loaders.registry import load_checkpoint
    from tests.helpers.tiny_families import hf_model, save_hf
    from tests.helpers.tiny_gpt_oss import config

    torch.manual_seed(0)
    # gpt-oss-20b's proportions (64 query / 8 KV heads of 64, window 128) narrowed
    return load_checkpoint(save_hf(tmp / "oss", hf_model(config(
        hidden_size=256, intermediate_size=64, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=2, head_dim=32, sliding_window=128, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=16384))))


FAMILIES = {"glm": glm, "gpt_oss": gpt_oss}


def run(engine: Any, rid: str, ids: list[int]) -> tuple[float, int]:
    t = time.perf_counter()
    engine.add_request(rid, ids, SamplingParams(max_tokens=1, temperature=0.0,
                                                ignore_eos=True, retain_prefix=True))
    cached = 0
    while engine.has_work():
        for d in engine.step():
            cached = max(cached, d.num_cached_tokens)
    return time.perf_counter() - t, cached


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=sorted(FAMILIES), default="glm")
    p.add_argument("--prefix", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--absorb", default=None, help="MLA: force MLAttention.absorb")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gguf", default=None, help="a checkpoint instead of --family's tiny model")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        if a.gguf:
            from pensieve.loaders.registry import load_checkpoint
            ckpt = load_checkpoint(a.gguf)
        else:
            ckpt = FAMILIES[a.family](Path(tmp))
        vocab = ckpt.args.vocab_size
        for n in a.prefix:
            cfg = EngineConfig(device=a.device, dtype=torch.bfloat16 if cuda else torch.float32,
                               context_length=n + a.new + 64, max_num_seqs=2,
                               max_num_batched_tokens=2048)
            eng = build_engine(ckpt, cfg)
            if a.absorb:
                from pensieve.models.deepseek_mla import MLAttention
                for m in eng.runner.model.modules():
                    if isinstance(m, MLAttention):
                        m.absorb = a.absorb
            g = torch.Generator().manual_seed(n)
            one = torch.randint(3, vocab, (n,), generator=g).tolist()
            two = one + torch.randint(3, vocab, (a.new,), generator=g).tolist()
            t1, _ = run(eng, "t1", one)
            run(eng, "w", two)  # warm: turn 2's shapes once
            eng_two = [*one, *torch.randint(3, vocab, (a.new,), generator=g).tolist()]
            if a.profile:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=acts) as prof:
                    t2, hit = run(eng, "t2", eng_two)
                table = prof.key_averages()
                print(table.table(sort_by="self_cpu_time_total", row_limit=14))
                if cuda:
                    print(table.table(sort_by="self_device_time_total", row_limit=20))
            else:
                t2, hit = run(eng, "t2", eng_two)
            print(f"{a.family} prefix {n}: turn 1 {t1 * 1e3:.0f} ms, turn 2 ({hit} cached, "
                  f"{len(eng_two) - hit} new) {t2 * 1e3:.1f} ms = {100 * t2 / t1:.2f}%", flush=True)


if __name__ == "__main__":
    main()
