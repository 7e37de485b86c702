"""On CUDA: one layer's decode glue at GLM-4.7-Flash's and gpt-oss-20b's shapes, the torch form
vs the one-launch kernels (graph replay, median µs, and the largest difference):

* GLM-4.7-Flash's sigmoid router after its GEMM (64 experts, top-4, correction bias, scale 1.8;
  and DeepSeek-V3's 256 in 8 groups keeping 4): ``models/moe.Router`` torch vs
  ``cuda_router.sigmoid_topk``;
* gpt-oss-20b's router (32 experts, top-4): top-k + softmax vs ``cuda_router.topk_softmax``;
* the MLA head glue (20 heads, rank 512, rope 64): norm + two RoPEs + cat + ``index_copy_`` vs
  ``cuda_hybrid_mla_rope.rope_write``.

At 1 and 8 decode rows. ``python -m bench.hybrid_glue`` (prints a markdown table).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.gpu_moe_kernels import gpu_ms, graphed

DEV = "cuda"  # a smoke run sets "cpu" (Triton interpreter, no timings)


def _us(fn, reps: int = 50) -> float:
    return gpu_ms(graphed(fn), reps) * 1e3


def sigmoid_rows(t: int) -> list[str]:
    from pensieve.backends import cuda_router
    from pensieve.models.args import MoEArgs
    from pensieve.models.moe import Router

    rows = []
    for label, e, k, groups, kept in (("GLM-4.7-Flash", 64, 4, 1, 1),
                                      ("DeepSeek-V3", 256, 8, 8, 4)):
        moe = MoEArgs(num_experts=e, top_k=k, expert_size=8, gating="sigmoid", norm_topk=True,
                      scale=1.8, correction_bias=True, n_group=groups, topk_group=kept)
        router = Router(SimpleNamespace(moe=moe, hidden_size=2048)).to(DEV)  # type: ignore[arg-type]
        with torch.no_grad():
            router.weight.normal_(std=0.02)
            router.e_score_correction_bias.normal_(std=0.1)
        logits = torch.randn(t, e, device=DEV)
        ref = _us(lambda: router._sigmoid(logits))
        ker = _us(lambda: cuda_router.sigmoid_topk(logits, router.e_score_correction_bias, k,
                                                   groups, kept, True, 1.8))
        w1, i1 = router._sigmoid(logits)
        w2, i2 = cuda_router.sigmoid_topk(logits, router.e_score_correction_bias, k, groups,
                                          kept, True, 1.8)
        same = torch.equal(i1.sort(1)[0], i2.sort(1)[0])
        rows.append(f"| {label} sigmoid router | {t} | {ref:.1f} | {ker:.1f} | ids equal {same}, "
                    f"max |dw| {(w1.sort(1)[0] - w2.sort(1)[0]).abs().max().item():.1e} |")
    return rows


def gpt_oss_row(t: int) -> str:
    from pensieve.backends import cuda_router

    logits = torch.randn(t, 32, device=DEV, dtype=torch.bfloat16)

    def torch_form():  # noqa: ANN202
        top, ids = torch.topk(logits, 4, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), ids

    ref, ker = _us(torch_form), _us(lambda: cuda_router.topk_softmax(logits, 4))
    w1, _ = torch_form()
    w2, _ = cuda_router.topk_softmax(logits, 4)
    return (f"| gpt-oss-20b router | {t} | {ref:.1f} | {ker:.1f} | max |dw| "
            f"{(w1.float() - w2.float()).abs().max().item():.1e} |")


def mla_row(t: int) -> str:
    from pensieve.backends.cuda_hybrid_mla_rope import rope_write
    from pensieve.models.deepseek_mla import rotate_pairs

    dev, dt = DEV, torch.bfloat16
    heads, nope, rope, rank = 20, 192, 64, 512
    q = torch.randn(t, heads * (nope + rope), device=dev, dtype=dt).view(t, heads, -1)
    kv = torch.randn(t, rank + rope, device=dev, dtype=dt)
    w = torch.rand(rank, device=dev, dtype=dt)
    ang = torch.rand(t, 1, rope // 2, device=dev) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)
    slots = torch.randperm(4096, device=dev)[:t]
    cache = torch.zeros(1024, 4, 1, rank + rope, device=dev, dtype=dt)
    q_pe = q[..., nope:]

    def torch_form():  # noqa: ANN202
        latent, k_pe = kv.split([rank, rope], dim=-1)
        latent = torch.nn.functional.rms_norm(latent, (rank,), w, 1e-6)
        qr, kr = rotate_pairs(q_pe, (cos, sin)), rotate_pairs(k_pe.unsqueeze(1), (cos, sin))
        entries = torch.cat((latent, kr[:, 0]), dim=-1)
        cache.view(-1, rank + rope).index_copy_(0, slots, entries)
        return qr

    ref = _us(torch_form)
    ker = _us(lambda: rope_write(q_pe, kv, w, 1e-6, cos, sin, slots, cache, True))
    diff = (torch_form().float() - rope_write(q_pe, kv, w, 1e-6, cos, sin, slots, cache,
                                              True).float()).abs().max().item()
    return f"| MLA glue (20 heads, rank 512) | {t} | {ref:.1f} | {ker:.1f} | max |dq| {diff:.1e} |"


def main() -> None:
    print(torch.cuda.get_device_name() if DEV == "cuda" else DEV)
    print("| part | rows | torch form µs | kernel µs | check |\n|---|---|---|---|---|")
    for t in (1, 8):
        for line in [*sigmoid_rows(t), gpt_oss_row(t), mla_row(t)]:
            print(line, flush=True)


if __name__ == "__main__":
    main()
