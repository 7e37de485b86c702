"""Route every ``CudaMoEExperts`` of a model on the GPU, per decode bucket, to the fastest of its
kernels (``cuda_moe.Plan``), timed at start over the layer's own weights.

``cuda_moe.moe_experts`` has four ways to run a layer's picks: ``pick_gemv`` (one program per
(pick, outputs): an expert's weights read once a pick), the expert-major GEMV of
``cuda_moe_expert`` (each picked expert's weights once for all its tokens, on the tensor
cores; 2-16 tokens), ``cuda_moe_rows`` (pick_gemv's CUDA-core loop expert-major: an expert's
weights once a pass of R of its tokens; 2-16 tokens, ``ROWS_CANDIDATES``) and the sorted
``grouped_gemm`` (its ``align`` step included). Which wins at a
few tokens depends on how often the picks repeat an expert (gpt-oss-20b's 32 experts at top-4:
~1.56 picks an expert at 8 tokens; Qwen3.6's 256 at top-8: ~1.1) and on the GPU, so a constant
(``GEMV_MAX_PICKS``) cannot be right everywhere. Per layer shape (experts, widths, formats,
biases and activation, top-k; the layers of a shape share one plan) and per bucket of
``BUCKETS`` (the decode graphs' row counts up to 64, ``cuda_graph_runner.bucket_sizes``):

* ``ROUTINGS`` uniformly random top-k routings (distinct experts a token, random weights) and
  random inputs, seeded (the same plan for the same weights and GPU timings);
* each candidate — the expert GEMV where it applies, the grouped GEMM at each of
  ``GROUPED_CANDIDATES`` (swap-AB tiles among them: ``cuda_moe_kernels.expert_rows``'
  ``SWAP``) — runs the whole layer once on the first routing against
  ``cuda_moe.reference_layer`` (float32, the picked experts dequantised one at a time;
  relative error under 2e-2); one that fails to build or is wrong is left out with a warning;
* pick_gemv's two launches differ in shape (30B-A3B: the fused gate/up K = 2048 to 768
  outputs, two weight rows each; down K = 768 to 2048 outputs — 8192 programs of three
  16-row steps at 8 tokens with the gate/up's tile), so its tiles are raced a projection at a
  time (``gemv_candidates``: ``GEMV_CANDIDATES`` and ``GATE_UP_CANDIDATES`` for gate/up,
  ``GEMV_CANDIDATES`` unpaired, ``DOWN_CANDIDATES`` and, where down's K fits one step,
  ``DOWN_WHOLE_K`` for down): each checked in the whole layer beside the constant rule's tile
  for the other launch, each right one's launch timed alone (down on random activations),
  and the fastest of each paired (``cuda_moe.GemvTiles``), checked, then timed whole beside
  the constant rule's pair as the other routes are;
* the right ones are timed (``graph_us``: the calls over all routings captured in one CUDA
  graph and replayed, GPU time only — as the decode graphs run them, with no launch cost to
  hide behind ``cuda_int4_tune.gpu_us``'s sleeping kernel, which the grouped route's four
  launches a call could outrun at 1-2 tokens; ``gpu_us`` where a capture fails), cycling the
  routings over up to ``ROUTINGS`` layers of the shape so that a call does not find the
  experts the previous one read in L2; the fastest taken. None right: no entry (the constant
  rule, itself one of the candidates, at that bucket).

(An earlier start's gemv entry of one tile set reads as that tile for both launches.) A
shape's plan is kept between starts (``tune_cache``, kind "moe": keyed by the GPU, the
software, the dtype, the shape and the buckets; the file named by these kernels' sources): a
later start checks each bucket's kept route once against the reference instead of timing (and
compiling) every candidate, and times afresh where one fails.

Past the last bucket (prefill chunks) the constant rule stands. The choice per bucket is fixed
after start, so the graphs captured at a bucket replay its route. Logged like the other tuners'
plans; ``PENSIEVE_MOE_ROUTE=static`` skips the timing (the constant rule everywhere).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pensieve.backends import cuda_moe, cuda_moe_expert
from pensieve.backends.cuda_moe import CudaMoEExperts, GemvTiles, Plan, Route, Tiles
from pensieve.backends.tune_cache import TuneCache, device_key

log = logging.getLogger(__name__)

ENV = "PENSIEVE_MOE_ROUTE"  # "static": today's constant rule, no timing
BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)  # tokens a plan entry serves up to (decode graph rows)
ROUTINGS = 8  # random routings (and layers of the shape) a timed call cycles through
# pick_gemv: the two tile sets of the constant rule (few picks / more), each raced at every bucket
# and the first with an output's gate and up rows in one K loop (``Tiles.pair``: won every
# pick-GEMV bucket of the 30B-A3B's race on an H200, 28 vs 31 µs a layer at 1 token)
GEMV_CANDIDATES = (cuda_moe.GEMV_FEW, cuda_moe.GEMV, Tiles(1, 8, 512, 4, 2, pair=True))
# the gate/up launch's own: paired rows a thread each at 8 warps (16 rows x 16 groups; 4 steps
# of 2048) and two 1024-wide steps of 4 outputs (8 rows x 32 groups) — fewer serial rounds of
# loads. The down launch's own (K = 768 at 30B-A3B: three 256-steps of 16 rows with the
# constant rule's tile): 32 rows a program (half the programs) at 256 and at 128 a step, 16
# rows at 128 on 2 warps (a (row, group) pair a thread in each), and DOWN_WHOLE_K, the row
# whole in one step where K ≤ 1024 (the 4-bit layouts' ``MASK_K``: 768's last 256 masked).
# sm_90 builds (Triton 3.9, bf16, aligned): 32-56 registers, no spill, the codes' 16-byte and
# x's int64-word loads kept, int4/q4k/six/fp4/int8 (tests/unit/test_cuda_moe_loads.py)
GATE_UP_CANDIDATES = (Tiles(1, 8, 512, 8, 2, pair=True), Tiles(1, 4, 1024, 8, 2, pair=True))
DOWN_CANDIDATES = (Tiles(1, 32, 256, 8, 2), Tiles(1, 32, 128, 4, 2), Tiles(1, 16, 128, 2, 2))
DOWN_WHOLE_K = Tiles(1, 8, 1024, 8, 2)
# grouped_gemm at decode sizes: 16-row blocks (the tensor cores' least), the default and two
# from bench/gpu_moe_kernels.py's sweep (narrower outputs: more programs; wider), then two
# swap-AB tiles (the expert's 64/128 outputs the MMA's M side, the 1-2 tokens an expert picks
# padded to 16 on its N side; interpreter-checked, untimed; sm_90 builds, Triton 3.9, fused
# gate/up: 98-205 registers at 64 outputs, no spill; 166-255 at 128, int8 spills 184 bytes —
# 64-step swap tiles spill 160-1800 bytes at 4 warps, so 32-wide steps and 8 warps)
GROUPED_CANDIDATES = (cuda_moe.GROUPED_SMALL, Tiles(16, 32, 128, 4, 4), Tiles(16, 128, 64, 4, 3),
                      Tiles(16, 64, 32, 8, 3, swap=True), Tiles(16, 128, 32, 8, 3, swap=True))
# the expert-major GEMV beside its constants (32 outputs, 64 a step, 8 warps): swap-AB, 64
# outputs the MMA's M side, 32-wide steps (block_m: the tokens' power of two, not this)
EXPERT_CANDIDATES = (Tiles(16, 64, 32, 8, 2, swap=True),)
# the expert-major pick GEMV (``cuda_moe_rows``; block_m: the rows a pass over an expert's
# weights, R): 2 and 4 rows at pick_gemv's constant-rule tile (a (row, group) pair a thread)
# and 2 rows with the gate/up rows paired at 8 outputs x 512. sm_90 builds (Triton 3.9, bf16,
# aligned): no spills, codes in 16-byte words, no shared memory in the K loops
# (tests/unit/test_cuda_moe_rows.py); interpreter-checked, untimed on a GPU
ROWS_CANDIDATES = (Tiles(2, 16, 256, 4, 2), Tiles(4, 16, 256, 4, 2),
                   Tiles(2, 8, 512, 4, 2, pair=True))
ROWS_MAX_TOKENS = 16
PLANS = TuneCache("moe", ("cuda_moe.py", "cuda_moe_kernels.py", "cuda_moe_expert.py",
                          "cuda_moe_expert_kernels.py", "cuda_moe_tune.py", "cuda_moe_rows.py",
                          "cuda_moe_rows_kernels.py"))

Case = tuple[CudaMoEExperts, torch.Tensor, torch.Tensor, torch.Tensor]  # layer, x, weights, ids
Run = Callable[[Case], torch.Tensor]
Timer = Callable[[Run, list[Case], int], float]


def static(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``PENSIEVE_MOE_ROUTE=static`` asks for the constant rule."""
    return (os.environ if environ is None else environ).get(ENV, "").strip().lower() == "static"


def launch(route: Route, case: Case) -> torch.Tensor:
    """The layer of ``case`` on ``route`` (``cuda_moe.moe_experts``)."""
    layer, x, w, ids = case
    name, tiles = route
    return cuda_moe.moe_experts(x, w, ids, *layer.stacks(), layer.num_experts, route=name,
                                glu=layer.glu, tiles=tiles)


def launch_projection(route: Route, case: Case) -> torch.Tensor:
    """One pick_gemv launch of ``case``'s layer alone, as ``moe_experts`` runs it, at
    ``route`` = (projection, tiles): "gate_up" (x [T, H] → [P, I], fused) or "down" (x the
    picks' activations side by side, [T, k·I] → [P, H], routed)."""
    (projection, tiles), (layer, x, w, ids) = route, case
    assert isinstance(tiles, Tiles)
    gu, dn = layer.stacks()
    flat, rw = ids.reshape(-1).contiguous(), w.reshape(-1).contiguous()
    if projection == "gate_up":
        h = torch.empty(flat.numel(), gu.n // 2, device=x.device, dtype=x.dtype)
        return cuda_moe.pick_gemv(x, flat, rw, gu, h, topk=ids.shape[1], gather=True, fuse=True,
                                  routed=False, t=tiles, glu=layer.glu)
    out = torch.empty(flat.numel(), dn.n, device=x.device, dtype=x.dtype)
    return cuda_moe.pick_gemv(x.reshape(flat.numel(), dn.k), flat, rw, dn, out,
                              topk=ids.shape[1], gather=False, fuse=False, routed=True, t=tiles)


def gemv_candidates(layer: CudaMoEExperts) -> tuple[tuple[Tiles, ...], tuple[Tiles, ...]]:
    """pick_gemv's tiles raced for each launch: (gate/up's, down's) — ``GEMV_CANDIDATES`` for
    both (down's unpaired: ``pair`` is the fused launch's), ``GATE_UP_CANDIDATES``,
    ``DOWN_CANDIDATES``, ``DOWN_WHOLE_K`` where down's K ≤ its step, and packed MXFP4's own
    (the constant rule's) for an fp4 stack."""
    gu, dn = layer.stacks()
    fp4 = (cuda_moe.GEMV_FEW_FP4, cuda_moe.GEMV_FP4)
    gate_up = GEMV_CANDIDATES + GATE_UP_CANDIDATES + (fp4 if gu.fp4 else ())
    whole = (DOWN_WHOLE_K,) if dn.k <= DOWN_WHOLE_K.block_k else ()
    down = tuple(dataclasses.replace(t, pair=False) for t in GEMV_CANDIDATES + (
        fp4 if dn.fp4 else ())) + DOWN_CANDIDATES + whole
    return tuple(dict.fromkeys(gate_up)), tuple(dict.fromkeys(down))


def candidates(layer: CudaMoEExperts, tokens: int) -> list[Route]:
    """The routes raced whole at ``tokens`` rows besides pick_gemv (whose tiles are raced a
    launch at a time: ``gemv_candidates``): the expert-major GEMV at 2..16 tokens (its
    constants and ``EXPERT_CANDIDATES``), the expert-major pick GEMV at 2..16
    (``ROWS_CANDIDATES``), every grouped tile set."""
    out: list[Route] = []
    if 2 <= tokens <= cuda_moe_expert.MAX_TOKENS:
        out += [("experts", t) for t in dict.fromkeys((None, *EXPERT_CANDIDATES))]
    if 2 <= tokens <= ROWS_MAX_TOKENS:
        out += [("rows", t) for t in dict.fromkeys(ROWS_CANDIDATES)]
    out += [("grouped", t) for t in dict.fromkeys(GROUPED_CANDIDATES)]
    return out


def static_route(layer: CudaMoEExperts, tokens: int) -> Route:
    """What the constant rule runs at ``tokens`` rows (``PENSIEVE_MOE_EXPERT_GEMV`` unset):
    pick_gemv up to ``GEMV_MAX_PICKS`` picks, else the grouped GEMM's decode tiles."""
    p = tokens * layer.top_k
    if p <= cuda_moe.GEMV_MAX_PICKS:
        return "gemv", cuda_moe.gemv_pair(None, p, *layer.stacks())
    small = p <= cuda_moe.GROUPED_SMALL_MAX_PICKS
    return "grouped", cuda_moe.GROUPED_SMALL if small else cuda_moe.GROUPED


def describe(route: Route | None) -> str:
    """A route in a few characters: ``gemv 1x8x512w4 pair/1x32x256w8`` (gate/up's tiles, then
    down's), ``experts``, ``grouped 16x64x64w4`` (block_m x block_n x block_k, warps); a
    projection timed alone ``down 1x32x256w8``; None: the constant rule."""
    if route is None:
        return "static"
    name, t = route
    if t is None:
        return name
    if isinstance(t, GemvTiles):
        return f"{name} {tile_text(t.gate_up)}/{tile_text(t.down)}"
    return f"{name} {tile_text(t)}"


def tile_text(t: Tiles) -> str:
    """``1x16x256w4`` (block_m x block_n x block_k, warps), `` swap``/`` pair`` where set."""
    return (f"{t.block_m}x{t.block_n}x{t.block_k}w{t.num_warps}"
            f"{' swap' if t.swap else ''}{' pair' if t.pair else ''}")


def shape_key(m: CudaMoEExperts) -> tuple:
    """What a plan is shared by: experts, widths, formats, activation, biases, picks a token."""
    return (m.num_experts, m.hidden, m.inner, m.formats, m.glu, m.gate_up_b is not None,
            m.down_b is not None, m.top_k)


def prepare(model: nn.Module, dtype: torch.dtype, reps: int = 10, timer: Timer | None = None,
            buckets: Sequence[int] = BUCKETS, environ: Mapping[str, str] | None = None,
            cache: TuneCache | None = None) -> dict[tuple, Plan]:
    """Plan every ``CudaMoEExperts`` of ``model`` on its GPU (in ``dtype``) whose ``top_k`` is
    known; returns the plans by ``shape_key``. ``timer``: GPU µs of a run over cases
    (``graph_us``; tests pass their own); ``cache``: the kept plans (``PLANS``; tests pass
    their own)."""
    layers = [m for m in model.modules() if isinstance(m, CudaMoEExperts) and m.top_k > 0]
    if not layers:
        return {}
    if static(environ):
        for m in layers:
            m.plan = None
        log.info("MoE routes: the constant rule (%s=static)", ENV)
        return {}
    timer = timer or graph_us
    shapes: dict[tuple, list[CudaMoEExperts]] = {}
    for m in layers:
        shapes.setdefault(shape_key(m), []).append(m)
    plans, notes = {}, []
    for key, same in shapes.items():
        kept = cache if cache is not None else PLANS if same[0].gate_up_w.is_cuda else None
        plan = None if kept is None else load(same[0], dtype, buckets, kept)
        times: dict[int, dict[Route, float]] = {}
        if plan is None:
            plan, times = plan_layers(same[:ROUTINGS], dtype, reps, timer, buckets)
            if kept is not None and plan:  # (none right anywhere: timed again next start)
                store(same[0], dtype, buckets, plan, kept)
        for m in same:
            m.plan = plan
        plans[key] = plan
        notes.append(note(same[0], plan, times))
    log.info("MoE routes per decode bucket (µs a layer call): %s", "; ".join(notes))
    if torch.cuda.is_available() and layers[0].gate_up_w.is_cuda:
        torch.cuda.empty_cache()  # the timing graphs' pools and the references: not kept
    return plans


def graph_us(run: Run, cases: list[Case], reps: int) -> float:
    """Median GPU µs a case of ``run`` over ``cases``, all of them captured in one CUDA graph
    and replayed ``reps`` times (compiled and warmed up eagerly first, on a side stream);
    ``cuda_int4_tune.gpu_us`` (eager launches behind a sleeping kernel) where capture fails."""
    from pensieve.backends.cuda_int4_tune import gpu_us

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in cases:
            run(c)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for c in cases:
                run(c)
    except Exception as e:  # noqa: BLE001 - time it eagerly instead
        log.info("MoE route timing: graph capture failed (%s); eager", type(e).__name__)
        del graph
        torch.cuda.synchronize()
        return gpu_us(run, cases, reps)  # type: ignore[arg-type]
    graph.replay()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(cases))
    del graph
    return sorted(samples)[reps // 2] * 1e3


def cache_key(layer: CudaMoEExperts, dtype: torch.dtype, buckets: Sequence[int]) -> str:
    """A shape's key in the kept plans: the GPU and software (``device_key``), the shape, the
    buckets."""
    return (f"{device_key(layer.gate_up_w.device, dtype)}|{shape_key(layer)}|"
            f"{','.join(map(str, buckets))}")


def to_json(plan: Plan) -> dict[str, list]:
    """A plan as JSON: {bucket: [route, tiles]}, tiles None, a list of ``Tiles``' fields or,
    for pick_gemv's pair, {"gate_up": fields, "down": fields}."""
    def tiles(t: Tiles | GemvTiles | None) -> list | dict | None:
        if isinstance(t, GemvTiles):
            return {"gate_up": list(dataclasses.astuple(t.gate_up)),
                    "down": list(dataclasses.astuple(t.down))}
        return None if t is None else list(dataclasses.astuple(t))

    return {str(b): [name, tiles(t)] for b, (name, t) in plan.items()}


def from_json(raw: Mapping[str, list]) -> Plan:
    """``to_json``'s inverse; an older gemv entry's one tile set reads as that set for both
    launches (as it ran). Malformed: TypeError, ValueError or KeyError."""
    plan: Plan = {}
    for b, (name, t) in raw.items():
        if name not in cuda_moe.ROUTES:
            raise ValueError(name)
        tiles: Tiles | GemvTiles | None
        if isinstance(t, dict):
            if name != "gemv":
                raise ValueError(f"{name}: a tile pair")
            tiles = GemvTiles(Tiles(*t["gate_up"]), Tiles(*t["down"]))
        else:
            tiles = None if t is None else Tiles(*t)
            if name == "gemv" and tiles is not None:
                tiles = GemvTiles(tiles, tiles)
        plan[int(b)] = (name, tiles)
    return plan


def load(layer: CudaMoEExperts, dtype: torch.dtype, buckets: Sequence[int],
         cache: TuneCache | None = None) -> Plan | None:
    """An earlier start's plan for ``layer``'s shape where every bucket's route still builds
    and is right (checked once on a random routing); else None (time afresh)."""
    raw = (cache or PLANS).get(cache_key(layer, dtype, buckets))
    if raw is None:
        return None
    try:
        plan = from_json(raw)
    except (TypeError, ValueError, KeyError):
        return None
    if not plan:
        return None
    for b, route in plan.items():
        case = (layer, *routings(layer, b, dtype, 1, seed=b)[0])
        if not checked(route, case, cuda_moe.reference_layer(*case)):
            return None
    log.info("MoE routes of %s: kept from an earlier start, checked", shape_key(layer))
    return plan


def store(layer: CudaMoEExperts, dtype: torch.dtype, buckets: Sequence[int], plan: Plan,
          cache: TuneCache | None = None) -> None:
    (cache or PLANS).put(cache_key(layer, dtype, buckets), to_json(plan))


def note(layer: CudaMoEExperts, plan: Plan, times: Mapping[int, Mapping[Route, float]]) -> str:
    """A shape's plan for the log: ``32x2880x2880 top-4: 1 gemv 1x8x512w4 31 µs, …, 8
    grouped 16x64x64w4 90 µs (static 140)`` (the constant rule's time where it lost)."""
    parts = []
    for b, r in plan.items():
        us, was = times.get(b, {}).get(r), times.get(b, {}).get(static_route(layer, b))
        parts.append(f"{b} {describe(r)}" + ("" if us is None else f" {us:.0f} µs")
                     + ("" if was is None or r == static_route(layer, b) else
                        f" (static {was:.0f})"))
    return (f"{layer.num_experts}x{layer.inner}x{layer.hidden} top-{layer.top_k}: "
            + (", ".join(parts) or "no route timed"))


def routings(layer: CudaMoEExperts, tokens: int, dtype: torch.dtype, n: int, seed: int
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``n`` (x, weights, ids) at ``tokens`` rows: uniformly random distinct experts a token,
    softmax weights renormalised over the picks; seeded."""
    dev = layer.gate_up_w.device
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(tokens, layer.hidden, device=dev, generator=g).to(dtype)
        scores = torch.rand(tokens, layer.num_experts, device=dev, generator=g)
        ids = scores.topk(layer.top_k, dim=-1).indices  # uniform: k distinct experts a token
        w = torch.softmax(torch.randn(tokens, layer.top_k, device=dev, generator=g), -1)
        out.append((x, w.to(dtype), ids))
    return out


def plan_layers(sample: list[CudaMoEExperts], dtype: torch.dtype, reps: int, timer: Timer,
                buckets: Sequence[int] = BUCKETS) -> tuple[Plan, dict[int, dict[Route, float]]]:
    """Each bucket's fastest right route for the layers of ``sample`` (one shape), and every
    right candidate's µs per bucket: the routes timed whole, and pick_gemv's launches timed
    alone as ("gate_up", tiles) and ("down", tiles) (``race_gemv``)."""
    first = sample[0]
    plan: Plan = {}
    times: dict[int, dict[Route, float]] = {}
    for b in buckets:
        sets = routings(first, b, dtype, ROUTINGS, seed=b)
        cases = [(sample[i % len(sample)], *s) for i, s in enumerate(sets)]
        ref = cuda_moe.reference_layer(cases[0][0], *cases[0][1:])
        gemv, times[b] = race_gemv(cases, ref, reps, timer, seed=b)
        right = gemv + [r for r in candidates(first, b) if checked(r, cases[0], ref)]
        for r in right:
            times[b][r] = timer(timed(launch, r), cases, reps)
        if right:
            plan[b] = min(right, key=times[b].__getitem__)
        else:
            log.warning("MoE %s at %d tokens: no route builds and is right; the constant rule",
                        shape_key(first), b)
    return plan, times


def timed(fn: Callable[[Route, Case], torch.Tensor], route: Route) -> Run:
    """A run of ``fn`` at ``route`` over a case, ``route`` on it (what it runs: tests' timers
    read it)."""
    def run(case: Case) -> torch.Tensor:
        return fn(route, case)
    run.route = route  # type: ignore[attr-defined]
    return run


def race_gemv(cases: list[Case], ref: torch.Tensor, reps: int, timer: Timer, seed: int
              ) -> tuple[list[Route], dict[Route, float]]:
    """pick_gemv's routes to time whole at ``cases``' bucket: the pair of each launch's
    fastest right tiles (``gemv_candidates``) and the constant rule's pair, each right; and
    every right tile's launch µs alone, as ("gate_up", tiles) / ("down", tiles). A tile is
    right where the whole layer is with it beside the constant rule's tile for the other
    launch; the down launch is timed on random activations (its time does not hang on them)."""
    layer, x, w, ids = cases[0]
    base = cuda_moe.gemv_pair(None, ids.numel(), *layer.stacks())
    seen: dict[Route, bool] = {}

    def right(route: Route) -> bool:
        if route not in seen:
            seen[route] = checked(route, cases[0], ref)
        return seen[route]

    gate_ups, downs = gemv_candidates(layer)
    gate_ups = tuple(t for t in gate_ups if right(("gemv", GemvTiles(t, base.down))))
    downs = tuple(t for t in downs if right(("gemv", GemvTiles(base.gate_up, t))))
    g = torch.Generator(device=x.device).manual_seed(seed)
    acts = [(m, (torch.randn(xc.shape[0], ic.shape[1] * m.inner, device=x.device, generator=g)
                 * 0.1).to(x.dtype), wc, ic) for m, xc, wc, ic in cases]
    us: dict[Route, float] = {}
    for projection, tiles, on in (("gate_up", gate_ups, cases), ("down", downs, acts)):
        for t in tiles:
            us[(projection, t)] = timer(timed(launch_projection, (projection, t)), on, reps)
    routes: list[Route] = []
    if gate_ups and downs:
        routes.append(("gemv", GemvTiles(min(gate_ups, key=lambda t: us[("gate_up", t)]),
                                         min(downs, key=lambda t: us[("down", t)]))))
    if static_route(layer, x.shape[0])[0] == "gemv":  # its time whole: what the race gains
        routes.append(("gemv", base))
    return [r for r in dict.fromkeys(routes) if right(r)], us


def checked(route: Route, case: Case, ref: torch.Tensor) -> bool:
    """``route`` builds and gives ``ref`` on ``case``; else left out with a warning."""
    layer = case[0]
    try:
        y = launch(route, case)
        err = ((y.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()
    except Exception as e:  # a Triton that cannot build it
        log.warning("MoE %s at %d tokens (%s) left out: %s", describe(route), case[1].shape[0],
                    layer.extra_repr(), str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    if not err < 2e-2:
        log.warning("MoE %s at %d tokens (%s) left out: relative error %.3g", describe(route),
                    case[1].shape[0], layer.extra_repr(), err)
        return False
    return True
