"""Attention with learned sinks (gpt-oss): one logit per head joins every softmax's denominator
and contributes no value, so a head can attend "nowhere".

    out = Σ_j exp(s_j) v_j / (exp(sink) + Σ_j exp(s_j))

SDPA has no sink term. Two exact ways, each used where it was the cheaper one
(``python -m bench.sink_attention``, gpt-oss-20b's 64 query / 8 KV heads; BENCHMARKS.md):

- one query row (decode): the softmax by hand — scores, a log-sum-exp that includes the sink,
  one matmul with V;
- several rows (prefill): SDPA over the keys plus one zero key whose additive mask entry is
  the head's sink logit, with a zero value row (~3× faster than by hand from 64 rows up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """q [n, Hq, D] over k, v [ctx, Hk, D] (Hq a multiple of Hk: query head h reads KV head
    h // (Hq / Hk)); ``sinks`` [Hq]; ``mask`` additive [n, ctx] or None (every key visible).
    Returns [n, Hq, D] in q's dtype; scale 1/√D."""
    if q.shape[0] == 1:
        return _by_hand(q, k, v, sinks, mask)
    return _sink_column(q, k, v, sinks, mask)


def _by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
    n, hq, d = q.shape
    ctx, hk = k.shape[0], k.shape[1]
    group = hq // hk
    qf = q.float().transpose(0, 1).reshape(hk, group * n, d)
    scores = (qf @ k.float().permute(1, 2, 0)).view(hq, n, ctx) * d ** -0.5
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logaddexp(torch.logsumexp(scores, dim=-1, keepdim=True),
                          sinks.float().view(hq, 1, 1))
    probs = torch.exp(scores - lse).view(hk, group * n, ctx)
    out = (probs @ v.float().transpose(0, 1)).view(hq, n, d)
    return out.transpose(0, 1).to(q.dtype)


def _sink_column(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
    n, hq, _ = q.shape
    ctx, hk = k.shape[0], k.shape[1]
    zero = k.new_zeros(1, hk, k.shape[2])
    k = torch.cat((k, zero))
    v = torch.cat((v, v.new_zeros(1, hk, v.shape[2])))
    base = mask if mask is not None else q.new_zeros(n, ctx)
    full = torch.cat((base.to(q.dtype).expand(hq, n, ctx),
                      sinks.to(q.dtype).view(hq, 1, 1).expand(hq, n, 1)), dim=-1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0), attn_mask=full.unsqueeze(0), enable_gqa=hq > hk)
    return out[0].transpose(0, 1)
