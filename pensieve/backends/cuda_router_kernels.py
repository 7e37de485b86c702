"""The MoE routers' Triton kernels (host side: ``cuda_router.py``).

Three selections, each one ``@triton.jit`` helper over a block of R tokens' float32 logits rows
(``softmax_pick``, ``sigmoid_pick``, ``topk_softmax_pick``), for:

* the standalone kernels (``softmax_topk``, ``sigmoid_topk``, ``topk_softmax``): logits made by
  the router's GEMM → one program a token (R = 1).

Picks: the largest first, the lowest expert id among equals; a NaN row (a padding row's garbage)
matches nothing and picks an expert in range (the expert kernels index by the ids).
Importing this module needs Triton.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def softmax_pick(x, R: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr,
                 K_PAD: tl.constexpr, NORM: tl.constexpr):
    """x [R, E_PAD] float32 logits → (top [R, K_PAD] float32 probabilities, renormalised over
    the K when NORM, ids [R, K_PAD] int64): softmax, then K passes of max."""
    e = tl.arange(0, E_PAD)[None, :]
    valid = e < E
    x = tl.where(valid, x, float("-inf"))
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(valid, p, -1.0)
    slot = tl.arange(0, K_PAD)[None, :]
    top = tl.zeros([R, K_PAD], tl.float32)
    ids = tl.zeros([R, K_PAD], tl.int64)
    for i in tl.static_range(K):
        best = tl.max(p, axis=1)
        pick = tl.minimum(tl.min(tl.where(p == best[:, None], e, E_PAD), axis=1), E - 1)
        top = tl.where(slot == i, best[:, None], top)
        ids = tl.where(slot == i, pick[:, None].to(tl.int64), ids)
        p = tl.where(e == pick[:, None], -2.0, p)
    if NORM:
        top = top / tl.sum(top, axis=1)[:, None]
    return top, ids


@triton.jit
def sigmoid_pick(x, bias, R: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                 S: tl.constexpr, S_PAD: tl.constexpr, KG: tl.constexpr, K: tl.constexpr,
                 K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    """x [R, G_PAD, S_PAD] float32 logits of G groups × S experts, bias [1, G_PAD, S_PAD]
    float32 (ignored without HAS_BIAS) → (top [R, K_PAD] unbiased scores, renormalised
    (``+ 1e-20``) when NORM, ids [R, K_PAD] int64): sigmoid, the bias, per group the sum of its
    two best biased scores, the KG best groups kept (the lowest index among equal sums), K
    passes of max over the kept experts' biased scores."""
    g = tl.arange(0, G_PAD)[None, :, None]
    s = tl.arange(0, S_PAD)[None, None, :]
    valid = (g < G) & (s < S)
    idx = g * S + s  # the expert id
    none = G * S  # past every expert
    score = tl.sigmoid(x)
    choice = score
    if HAS_BIAS:
        choice = score + bias
    avail = tl.broadcast_to(valid, (R, G_PAD, S_PAD))
    if KG < G:  # group-limited: keep the KG groups whose two best biased scores sum highest
        c = tl.where(valid, choice, float("-inf"))
        m1 = tl.max(c, axis=2)
        i1 = tl.min(tl.where(c == m1[:, :, None], s, S_PAD), axis=2)
        m2 = tl.max(tl.where(s == i1[:, :, None], float("-inf"), c), axis=2)
        worth = m1 + m2  # [R, G_PAD]
        gr = tl.arange(0, G_PAD)[None, :]
        kept = tl.zeros([R, G_PAD], tl.int32)
        for _ in tl.static_range(KG):
            free = (gr < G) & (kept == 0)
            best = tl.max(tl.where(free, worth, float("-inf")), axis=1)
            pick = tl.min(tl.where(free & (worth == best[:, None]), gr, G_PAD), axis=1)
            kept = tl.where(gr == pick[:, None], 1, kept)
        avail = avail & (kept[:, :, None] != 0)
    slot = tl.arange(0, K_PAD)[None, :]
    top = tl.zeros([R, K_PAD], tl.float32)
    ids = tl.zeros([R, K_PAD], tl.int64)
    for i in tl.static_range(K):
        best = tl.max(tl.max(tl.where(avail, choice, float("-inf")), axis=2), axis=1)
        hit = avail & (choice == best[:, None, None])
        pick = tl.minimum(tl.min(tl.min(tl.where(hit, idx, none), axis=2), axis=1), none - 1)
        at = idx == pick[:, None, None]
        w = tl.sum(tl.sum(tl.where(valid & at, score, 0.0), axis=2), axis=1)
        top = tl.where(slot == i, w[:, None], top)
        ids = tl.where(slot == i, pick[:, None].to(tl.int64), ids)
        avail = avail & ~at
    if NORM:
        top = top / (tl.sum(top, axis=1)[:, None] + 1e-20)
    return top, ids


@triton.jit
def topk_softmax_pick(x, R: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                      K: tl.constexpr, K_PAD: tl.constexpr):
    """x [R, E_PAD] float32 logits → (a softmax over the K largest [R, K_PAD], ids [R, K_PAD]
    int64), gpt-oss's order of ops."""
    e = tl.arange(0, E_PAD)[None, :]
    avail = tl.broadcast_to(e < E, (R, E_PAD))
    slot = tl.arange(0, K_PAD)[None, :]
    top = tl.full([R, K_PAD], float("-inf"), tl.float32)
    ids = tl.zeros([R, K_PAD], tl.int64)
    for i in tl.static_range(K):
        best = tl.max(tl.where(avail, x, float("-inf")), axis=1)
        hit = avail & (x == best[:, None])
        pick = tl.minimum(tl.min(tl.where(hit, e, E_PAD), axis=1), E - 1)
        top = tl.where(slot == i, best[:, None], top)
        ids = tl.where(slot == i, pick[:, None].to(tl.int64), ids)
        avail = avail & (e != pick[:, None])
    p = tl.exp(top - tl.max(top, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None], ids


@triton.jit
def _store(WEIGHTS, IDS, r, rmask, top, ids, K: tl.constexpr, K_PAD: tl.constexpr):
    """Rows ``r`` [R] (int64) of WEIGHTS/IDS [T, K] from top/ids [R, K_PAD]."""
    slot = tl.arange(0, K_PAD)[None, :]
    keep = rmask[:, None] & (slot < K)
    tl.store(WEIGHTS + r[:, None] * K + slot, top.to(WEIGHTS.dtype.element_ty), mask=keep)
    tl.store(IDS + r[:, None] * K + slot, ids, mask=keep)


# --- the standalone selections: logits [T, E] → one program a token --------------------------


@triton.jit
def softmax_topk(LOGITS, WEIGHTS, IDS, s_row, scale, E: tl.constexpr, E_PAD: tl.constexpr,
                 K: tl.constexpr, K_PAD: tl.constexpr, NORM: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    e = tl.arange(0, E_PAD)[None, :]
    x = tl.load(LOGITS + r[:, None] * s_row + e, mask=e < E, other=float("-inf"))
    top, ids = softmax_pick(x.to(tl.float32), 1, E, E_PAD, K, K_PAD, NORM)
    _store(WEIGHTS, IDS, r, r >= 0, top * scale, ids, K, K_PAD)


@triton.jit
def sigmoid_topk(LOGITS, BIAS, WEIGHTS, IDS, s_row, scale, G: tl.constexpr,
                 G_PAD: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
                 KG: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                 HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    idx, valid = _grouped(G, G_PAD, S, S_PAD)
    x = tl.load(LOGITS + r[:, None, None] * s_row + idx, mask=valid, other=0.0)
    bias = _bias(BIAS, idx, valid, HAS_BIAS)
    top, ids = sigmoid_pick(x.to(tl.float32), bias, 1, G, G_PAD, S, S_PAD, KG, K, K_PAD,
                            HAS_BIAS, NORM)
    _store(WEIGHTS, IDS, r, r >= 0, top * scale, ids, K, K_PAD)


@triton.jit
def topk_softmax(LOGITS, WEIGHTS, IDS, s_row, E: tl.constexpr, E_PAD: tl.constexpr,
                 K: tl.constexpr, K_PAD: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
    e = tl.arange(0, E_PAD)[None, :]
    x = tl.load(LOGITS + r[:, None] * s_row + e, mask=e < E, other=0.0)
    top, ids = topk_softmax_pick(x.to(tl.float32), 1, E, E_PAD, K, K_PAD)
    _store(WEIGHTS, IDS, r, r >= 0, top, ids, K, K_PAD)


@triton.jit
def _grouped(G: tl.constexpr, G_PAD: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr):
    """The expert ids [1, G_PAD, S_PAD] of G groups × S experts, and which are real."""
    g = tl.arange(0, G_PAD)[None, :, None]
    s = tl.arange(0, S_PAD)[None, None, :]
    return g * S + s, (g < G) & (s < S)


@triton.jit
def _bias(BIAS, idx, valid, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(BIAS + idx, mask=valid, other=0.0).to(tl.float32)
    return tl.zeros(idx.shape, tl.float32)
