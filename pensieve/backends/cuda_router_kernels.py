"""The MoE routers' Triton kernels (host side: ``cuda_router.py``, ``cuda_router_fused.py``).

Three selections, each one ``@triton.jit`` helper over a block of R tokens' float32 logits rows
(``softmax_pick``, ``sigmoid_pick``, ``topk_softmax_pick``), shared by two kinds of kernel:

* the standalone ones (``softmax_topk``, ``sigmoid_topk``, ``topk_softmax``): logits made by
  the router's GEMM → one program a token (R = 1);
* the fused ones (``fused_softmax``, ``fused_sigmoid``, ``fused_topk_softmax``): x and the
  router's weight → the selection in ONE launch. Program (i, j) multiplies experts
  [i·BE, (i+1)·BE) by x's columns [j·HS, (j+1)·HS) for every token (``_partial``: float32
  accumulation; ``tl.dot`` or, for a token or a few on a float32 weight, products held in
  registers) and stores the float32
  partial in the router's workspace; then it bumps the router's counter (``_arrive``: the
  threadfence-reduction pattern, as ``cuda_splitk_kernels.finish``) and the LAST program to
  arrive sums the SPLIT partials of each logit in a fixed order (deterministic), rounds the
  sum to the torch form's logits dtype (the dtype of WEIGHTS: x's for softmax and gpt-oss,
  float32 for sigmoid), runs the selection on R tokens at a time and resets the counter to 0
  for the next launch or graph replay.

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
    the K when NORM, ids [R, K_PAD] int32): softmax, then K passes of max."""
    e = tl.arange(0, E_PAD)[None, :]
    valid = e < E
    x = tl.where(valid, x, float("-inf"))
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    p = tl.where(valid, p, -1.0)
    slot = tl.arange(0, K_PAD)[None, :]
    top = tl.zeros([R, K_PAD], tl.float32)
    ids = tl.zeros([R, K_PAD], tl.int32)
    for i in tl.static_range(K):
        best = tl.max(p, axis=1)
        pick = tl.minimum(tl.min(tl.where(p == best[:, None], e, E_PAD), axis=1), E - 1)
        top = tl.where(slot == i, best[:, None], top)
        ids = tl.where(slot == i, pick[:, None], ids)
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
    (``+ 1e-20``) when NORM, ids [R, K_PAD] int32): sigmoid, the bias, per group the sum of its
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
    ids = tl.zeros([R, K_PAD], tl.int32)
    for i in tl.static_range(K):
        best = tl.max(tl.max(tl.where(avail, choice, float("-inf")), axis=2), axis=1)
        hit = avail & (choice == best[:, None, None])
        pick = tl.minimum(tl.min(tl.min(tl.where(hit, idx, none), axis=2), axis=1), none - 1)
        at = idx == pick[:, None, None]
        w = tl.sum(tl.sum(tl.where(valid & at, score, 0.0), axis=2), axis=1)
        top = tl.where(slot == i, w[:, None], top)
        ids = tl.where(slot == i, pick[:, None], ids)
        avail = avail & ~at
    if NORM:
        top = top / (tl.sum(top, axis=1)[:, None] + 1e-20)
    return top, ids


@triton.jit
def topk_softmax_pick(x, R: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr,
                      K: tl.constexpr, K_PAD: tl.constexpr):
    """x [R, E_PAD] float32 logits → (a softmax over the K largest [R, K_PAD], ids [R, K_PAD]
    int32), gpt-oss's order of ops."""
    e = tl.arange(0, E_PAD)[None, :]
    avail = tl.broadcast_to(e < E, (R, E_PAD))
    slot = tl.arange(0, K_PAD)[None, :]
    top = tl.full([R, K_PAD], float("-inf"), tl.float32)
    ids = tl.zeros([R, K_PAD], tl.int32)
    for i in tl.static_range(K):
        best = tl.max(tl.where(avail, x, float("-inf")), axis=1)
        hit = avail & (x == best[:, None])
        pick = tl.minimum(tl.min(tl.where(hit, e, E_PAD), axis=1), E - 1)
        top = tl.where(slot == i, best[:, None], top)
        ids = tl.where(slot == i, pick[:, None], ids)
        avail = avail & (e != pick[:, None])
    p = tl.exp(top - tl.max(top, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None], ids


@triton.jit
def _store(WEIGHTS, IDS, r, rmask, top, ids, K: tl.constexpr, K_PAD: tl.constexpr):
    """Rows ``r`` [R] (int64) of WEIGHTS/IDS [T, K] from top/ids [R, K_PAD]."""
    slot = tl.arange(0, K_PAD)[None, :]
    keep = rmask[:, None] & (slot < K)
    tl.store(WEIGHTS + r[:, None] * K + slot, top.to(WEIGHTS.dtype.element_ty), mask=keep)
    tl.store(IDS + r[:, None] * K + slot, ids.to(tl.int64), mask=keep)


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


# --- the fused router: x [T, H] and the weight [E, H] → the selection, one launch -------------


@triton.jit
def _partial(X, W, WS, T, s_x, E: tl.constexpr, H: tl.constexpr, HS: tl.constexpr,
             BE: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr,
             F32: tl.constexpr):
    """This program's float32 x · W^T over experts [i·BE, +BE) and columns [j·HS, +HS) for the
    T tokens (BT ≥ T, a power of two) → WS[j, t, e] (rows of E). F32: the products in float32
    (a float32 weight: the torch form's float32 GEMM, x converted here), else in W's dtype.
    DOT: ``tl.dot`` (BT ≥ 16; a float32 weight in the MMA's IEEE mode: FMAs), else the
    products held in registers [BT, BE, BH], the column steps unrolled (every load of the
    span issued up front) and one reduction at the end."""
    pid_e = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = tl.arange(0, BT)
    ex = pid_e * BE + tl.arange(0, BE)
    tmask = t < T
    emask = ex < E
    h0 = pid_h * HS
    x_ptrs = X + t[:, None].to(tl.int64) * s_x + h0 + tl.arange(0, BH)[None, :]
    w_ptrs = W + ex[:, None].to(tl.int64) * H + h0 + tl.arange(0, BH)[None, :]
    if DOT:
        acc = tl.zeros([BT, BE], tl.float32)
        for k in range(0, HS, BH):
            kmask = (h0 + k + tl.arange(0, BH)) < H
            xt = tl.load(x_ptrs + k, mask=tmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w_ptrs + k, mask=emask[:, None] & kmask[None, :], other=0.0)
            if F32:
                acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc,
                             input_precision="ieee")
            else:
                acc = tl.dot(xt.to(wt.dtype), tl.trans(wt), acc)
    else:
        acc3 = tl.zeros([BT, BE, BH], tl.float32)
        for k in tl.static_range(0, HS, BH):
            kmask = (h0 + k + tl.arange(0, BH)) < H
            xt = tl.load(x_ptrs + k, mask=tmask[:, None] & kmask[None, :], other=0.0)
            wt = tl.load(w_ptrs + k, mask=emask[:, None] & kmask[None, :], other=0.0)
            if not F32:  # the product in W's dtype, as the torch form's GEMM takes x
                xt = xt.to(wt.dtype)
            acc3 += xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :]
        acc = tl.sum(acc3, axis=2)
    ws = WS + (pid_h * T + t[:, None]).to(tl.int64) * E + ex[None, :]
    tl.store(ws, acc, mask=tmask[:, None] & emask[None, :])


@triton.jit
def _arrive(CNT):
    """Whether this program is the launch's last to finish its partial (all stored before)."""
    tl.debug_barrier()  # every thread's partial stored before the release below
    done = tl.atomic_add(CNT, 1, sem="acq_rel", scope="gpu")
    return done == tl.num_programs(0) * tl.num_programs(1) - 1


@triton.jit
def _reset(CNT):
    tl.atomic_xchg(CNT, 0, sem="relaxed", scope="gpu")


@triton.jit
def _logits(WS, r, cols, mask, T, E: tl.constexpr, SPLIT: tl.constexpr):
    """The float32 logits of tokens ``r`` (broadcast against ``cols``, the expert ids): their
    SPLIT partials summed in a fixed order."""
    total = tl.zeros(mask.shape, tl.float32)
    for j in range(SPLIT):  # .cg: from L2, never a stale L1 line
        total += tl.load(WS + (j * T + r) * E + cols, mask=mask, other=0.0,
                         cache_modifier=".cg")
    return total


@triton.jit
def fused_softmax(X, W, WS, CNT, WEIGHTS, IDS, T, s_x, scale, H: tl.constexpr,
                  HS: tl.constexpr, SPLIT: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                  BT: tl.constexpr, DOT: tl.constexpr, R: tl.constexpr, E: tl.constexpr,
                  E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                  NORM: tl.constexpr, F32: tl.constexpr):
    """Softmax gating: logits rounded to x's dtype (WEIGHTS'), then ``softmax_pick``, scaled."""
    _partial(X, W, WS, T, s_x, E, H, HS, BE, BH, BT, DOT, F32)
    if _arrive(CNT):
        e = tl.arange(0, E_PAD)[None, :]
        for r0 in range(0, T, R):
            r = r0 + tl.arange(0, R).to(tl.int64)
            mask = (r[:, None] < T) & (e < E)
            x = _logits(WS, r[:, None], e, mask, T, E, SPLIT)
            x = x.to(WEIGHTS.dtype.element_ty).to(tl.float32)
            top, ids = softmax_pick(x, R, E, E_PAD, K, K_PAD, NORM)
            _store(WEIGHTS, IDS, r, r < T, top * scale, ids, K, K_PAD)
        _reset(CNT)


@triton.jit
def fused_sigmoid(X, W, BIAS, WS, CNT, WEIGHTS, IDS, T, s_x, scale, H: tl.constexpr,
                  HS: tl.constexpr, SPLIT: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr,
                  BT: tl.constexpr, DOT: tl.constexpr, R: tl.constexpr, G: tl.constexpr,
                  G_PAD: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr,
                  KG: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                  HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    """Sigmoid gating: float32 logits (W float32), then ``sigmoid_pick``, scaled."""
    _partial(X, W, WS, T, s_x, G * S, H, HS, BE, BH, BT, DOT, True)
    if _arrive(CNT):
        idx, valid = _grouped(G, G_PAD, S, S_PAD)
        bias = _bias(BIAS, idx, valid, HAS_BIAS)
        for r0 in range(0, T, R):
            r = r0 + tl.arange(0, R).to(tl.int64)
            mask = (r[:, None, None] < T) & valid
            x = _logits(WS, r[:, None, None], idx, mask, T, G * S, SPLIT)
            top, ids = sigmoid_pick(x, bias, R, G, G_PAD, S, S_PAD, KG, K, K_PAD, HAS_BIAS,
                                    NORM)
            _store(WEIGHTS, IDS, r, r < T, top * scale, ids, K, K_PAD)
        _reset(CNT)


@triton.jit
def fused_topk_softmax(X, W, BIAS, WS, CNT, WEIGHTS, IDS, T, s_x, H: tl.constexpr,
                       HS: tl.constexpr, SPLIT: tl.constexpr, BE: tl.constexpr,
                       BH: tl.constexpr, BT: tl.constexpr, DOT: tl.constexpr, R: tl.constexpr,
                       E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr,
                       K_PAD: tl.constexpr, F32: tl.constexpr):
    """gpt-oss: logits + bias (float32 sum, rounded once to x's dtype), then
    ``topk_softmax_pick``."""
    _partial(X, W, WS, T, s_x, E, H, HS, BE, BH, BT, DOT, F32)
    if _arrive(CNT):
        e = tl.arange(0, E_PAD)[None, :]
        bias = tl.load(BIAS + e, mask=e < E, other=0.0).to(tl.float32)
        for r0 in range(0, T, R):
            r = r0 + tl.arange(0, R).to(tl.int64)
            mask = (r[:, None] < T) & (e < E)
            x = _logits(WS, r[:, None], e, mask, T, E, SPLIT) + bias
            x = x.to(WEIGHTS.dtype.element_ty).to(tl.float32)
            top, ids = topk_softmax_pick(x, R, E, E_PAD, K, K_PAD)
            _store(WEIGHTS, IDS, r, r < T, top, ids, K, K_PAD)
        _reset(CNT)
