"""GLM-4.7-Flash-shaped latent attention: the Claude Code follow-up turn's TTFT against the cold
turn, in process, with the latent-space (absorbed) path for short chunks ("auto", the default)
or without it ("never": every prefill chunk expands its whole cached context through kv_b).

    .venv/bin/python -m bench.cpu_llamacpp_followup /tmp/hb_deepseek2.gguf --tools 1 --rounds 1
    # (writes /tmp/cc_ids_hb_deepseek2.json: turn 1 and turn 2 ids as Pensieve renders them)
    .venv/bin/python bench/mla_follow_up.py never; .venv/bin/python bench/mla_follow_up.py auto
"""
import json, sys, time, torch
from pensieve.backends.torch_backend import build_engine
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import SamplingParams
from pensieve.loaders.registry import load_checkpoint
from pensieve.models.deepseek_mla import MLAttention
mode = sys.argv[1]
torch.set_num_threads(2)
one, two = json.load(open('/tmp/cc_ids_hb_deepseek2.json'))[0][:2]
ckpt = load_checkpoint('/tmp/hb_deepseek2.gguf')
cfg = EngineConfig(context_length=8192, max_num_seqs=2, max_num_batched_tokens=2048)
eng = build_engine(ckpt, cfg)
for m in eng.runner.model.modules():
    if isinstance(m, MLAttention): m.absorb = mode
def ttft(rid, ids):
    t = time.perf_counter()
    eng.add_request(rid, ids, SamplingParams(max_tokens=1, temperature=0.0, retain_prefix=True))
    last = None
    while eng.has_work():
        for d in eng.step(): last = d
    return time.perf_counter() - t, last.num_cached_tokens
a, _ = ttft('t1', one); b, hit = ttft('t2', two)
print(f"{mode}: turn1 {len(one)} tok {a*1000:.0f} ms, turn2 {len(two)} tok (cached {hit}) {b*1000:.0f} ms, ratio {100*b/a:.1f}%")
