"""The hybrid decode step over static buffers (``backends/hybrid_static.py``, what the hybrid
CUDA graphs replay) computes what today's dynamic step computes.

Each tiny hybrid family runs through the real engine on the CPU. Every pure-decode step is run
twice: the dynamic step (``HybridCaches.run``), then — recurrent states and checkpoints put
back — the static one, with padding rows up to a bucket past the real rows and half the token
ids taken from a "carried" device tensor. Logits and the states written agree; the engine goes
on with the static step's logits, and its greedy tokens equal those of an engine left alone,
over a first turn (short prompts joining others' decodes: rows with nothing cached) and a
follow-up turn resuming from a state checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pensieve.backends.cuda_batch import token_at  # noqa: E402
from pensieve.backends.cuda_mla import latent_layers  # noqa: E402
from pensieve.backends.hybrid_static import StaticDecode  # noqa: E402
from pensieve.backends.torch_backend import build_model, torch_engine  # noqa: E402
from pensieve.engine.config import EngineConfig  # noqa: E402
from pensieve.engine.types import SamplingParams  # noqa: E402
from tests.helpers.paged_run import prompt  # noqa: E402
from tests.helpers.tiny_families import VOCAB  # noqa: E402
from tests.helpers.tiny_hybrid_checkpoints import FAMILIES  # noqa: E402
from tests.helpers.triton_interpreter import run_in_triton_interpreter  # noqa: E402

BLOCK, INTERVAL, STEPS, SEATS = 4, 16, 6, 4


def _engine(ckpt: Any):  # noqa: ANN202
    cfg = EngineConfig(device="cpu", dtype=torch.float32, context_length=128, block_size=BLOCK,
                       max_num_seqs=SEATS, max_num_batched_tokens=64,
                       state_checkpoint_interval=INTERVAL)
    return torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)


class Checked:
    """Wraps a hybrid runner's ``run``: each pure-decode step dynamic, then static (above)."""

    def __init__(self, runner: Any, heads: int | None = None) -> None:
        self.runner, self.run = runner, runner.run
        caches = runner.hybrid
        self.builder = None
        if heads is not None:  # what ModelRunner._init_hybrid builds on CUDA, here on the CPU
            from pensieve.backends.cuda_hybrid import CudaHybridBuilder

            latent = runner.fast.cuda_latent_attention
            self.builder = CudaHybridBuilder(
                caches.k_caches, caches.v_caches, caches.layer_group,
                [g.window for g in caches.plan.paged], BLOCK, torch.device("cpu"), num_sms=4,
                latent_heads=heads if latent else None)
        self.static = StaticDecode(caches, max_rows=2 * SEATS, max_seqs=SEATS,
                                   max_blocks=128 // BLOCK)
        self.latent = latent_layers(caches.k_caches, caches.v_caches, caches.layer_group) \
            if runner.fast.cuda_latent_attention else frozenset()
        self.steps = self.padded = self.fresh = self.restored = 0
        runner.run = self
        for i in caches.recurrent_layers:  # a slot nothing is cached in must be read as zeros
            caches.conv[i].normal_()
            caches.ssm[i].normal_()
            # checkpoints no step wrote are compared too: uninitialised memory there could hold
            # NaN bit patterns (NaN != NaN fails assert_close at random: CI, session 9)
            caches.saved_conv[i].normal_()
            caches.saved_ssm[i].normal_()

    def _states(self) -> list[torch.Tensor]:
        c = self.runner.hybrid
        return [t for i in c.recurrent_layers
                for t in (c.conv[i], c.ssm[i], c.saved_conv[i], c.saved_ssm[i])]

    def __call__(self, chunks, carried=None, carried_rows=()):  # noqa: ANN001, ANN204
        if not self.static.can_run(chunks):
            return self.run(chunks, carried, carried_rows)
        restored = any(c.request.cache is not None and c.request.cache.restore is not None
                       for c in chunks)
        before = [t.clone() for t in self._states()]
        want = self.run(chunks)
        wanted = [t.clone() for t in self._states()]
        for t, b in zip(self._states(), before):
            t.copy_(b)
        n = len(chunks)
        bucket = n + 1 + n % 2  # one or two padding rows
        ids = [token_at(c.request, c.request.num_computed_tokens) for c in chunks]
        carried_ids = torch.tensor(ids[::-1])  # row i's token at n-1-i
        rows = [n - 1 - i if i % 2 == 0 else -1 for i in range(n)]
        hybrid = self.runner.hybrid
        hybrid.restore(chunks)
        s = self.static.fill(chunks, bucket, carried_ids, rows)
        if self.builder is not None:
            from pensieve.backends.cuda_hybrid_graphs import static_attention

            attention = static_attention(self.builder, self.static, bucket, 4)
        else:
            attention = self.static.torch_attention(bucket, self.latent)
        with torch.inference_mode():
            got = self.static.forward(self.runner.model, bucket, attention)[:s]
        hybrid.save(chunks)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        for t, w in zip(self._states(), wanted):  # the scratch slot aside (padding rows')
            torch.testing.assert_close(t[: hybrid.scratch_slot], w[: hybrid.scratch_slot],
                                       atol=2e-4, rtol=1e-4)
        self.steps += 1
        self.padded += bucket > n
        self.fresh += any(c.request.num_computed_tokens == 0 for c in chunks)
        self.restored += restored
        return got


def _generate(engine: Any, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(max_tokens=STEPS, temperature=0.0,
                                                    ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    return out


def _turns(engine: Any) -> list[dict[str, list[int]]]:
    """A first turn: two prompts, then (once they decode) a one-token prompt and a short one
    joining them; a follow-up: the first prompt's 32 tokens (two checkpoint intervals) + one new
    token, so its only new token is a decode-shaped row resuming from a checkpoint."""
    long = prompt(33, VOCAB, seed=1)
    out: dict[str, list[int]] = {}
    for rid, ids in (("a", long), ("b", prompt(9, VOCAB, seed=2)), ("c", [7]),
                     ("d", prompt(2, VOCAB, seed=3))):
        engine.add_request(rid, ids, SamplingParams(max_tokens=STEPS, temperature=0.0,
                                                    ignore_eos=True))
        for _ in range(2):
            for delta in engine.step():
                out.setdefault(delta.request_id, []).extend(delta.token_ids)
    for rid, ids in _generate(engine, {}).items():
        out.setdefault(rid, []).extend(ids)
    follow = _generate(engine, {"e": long[:32] + [5]})
    return [out, follow]


def check(tmp_path: Path, family: str, kernels: bool = False) -> None:
    ckpt = FAMILIES[family](tmp_path)
    plain = _turns(_engine(ckpt))
    engine = _engine(ckpt)
    checked = Checked(engine.runner, ckpt.args.num_heads if kernels else None)
    assert _turns(engine) == plain
    assert checked.steps >= 6 and checked.padded == checked.steps
    assert checked.fresh >= 1  # a row with nothing cached (the one-token prompt's)
    if engine.runner.hybrid.recurrent_layers:
        assert checked.restored >= 1, "no decode row resumed from a checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_static_decode_step_matches_the_dynamic_one(tmp_path: Path, family: str) -> None:
    """The torch attention over the static buffers."""
    check(tmp_path, family)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5_moe", "gpt_oss", "glm4_moe_lite"])
def test_static_step_on_the_graphs_kernels_in_the_triton_interpreter(family: str) -> None:
    """The backend the hybrid CUDA graphs capture (``cuda_hybrid_graphs.static_attention``:
    the decode kernel with windows and sinks, the latent kernel) over the static buffers."""
    run_in_triton_interpreter(
        "import tempfile, pathlib; from tests.unit.test_hybrid_static_step import check; "
        f"check(pathlib.Path(tempfile.mkdtemp()), {family!r}, kernels=True); print('ok')")


@pytest.mark.parametrize("family", ["qwen3_5_moe", "gpt_oss"])
def test_gathered_experts_equal_the_grouped_ones(tmp_path: Path, family: str) -> None:
    """What a CUDA graph captures of a torch MoE layer (``gathered``: no host counts) equals
    its grouped path, repeated and unused experts included."""
    from pensieve.backends.torch_backend import build_model

    ckpt = FAMILIES[family](tmp_path)
    model = build_model(ckpt, EngineConfig(device="cpu", dtype=torch.float32))
    experts = [m for m in model.modules() if hasattr(m, "gathered")]
    assert experts
    gen = torch.Generator().manual_seed(0)
    for m in experts:
        x = torch.randn(5, m.gate_up_proj.weight.shape[2], generator=gen)
        ids = torch.tensor([[0, 1], [1, 0], [2, 2 % m.num_experts], [0, 3 % m.num_experts],
                            [1, 2]])
        weights = torch.rand(5, 2, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(m.gathered(x, weights, ids), m(x, weights, ids))


def test_static_latent_tiles_are_the_dynamic_ones_and_graphs_are_on_by_default() -> None:
    """A bucket's latent tiles (fixed at capture) are ``build_latent``'s for as many decode
    rows; the hybrid graphs are on unless ``PENSIEVE_HYBRID_GRAPHS=0``."""
    from pensieve.backends.cuda_hybrid_graphs import enabled, latent_tiles
    from pensieve.backends.cuda_mla import build_latent
    from pensieve.models.forward_context import SequenceSlice

    cpu = torch.device("cpu")
    seqs = [SequenceSlice(i, 1, 5 + 7 * i, torch.tensor([i, i + 1])) for i in range(3)]
    for heads in (4, 20, 40):
        batch = build_latent(seqs, heads, cpu, 4)
        assert batch is not None
        for got, want in zip(latent_tiles(3, heads, cpu),
                             (batch.tile_seq, batch.tile_lo, batch.tile_hi)):
            assert torch.equal(got, want)
    assert enabled({}) and enabled({"PENSIEVE_HYBRID_GRAPHS": "1"})
    assert not enabled({"PENSIEVE_HYBRID_GRAPHS": "0"})


class EagerGraph:
    """A captured graph's stand-in on the CPU: ``replay`` reruns the step into its output."""

    def __init__(self, run: Any, out: torch.Tensor) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        self.out.copy_(self.run())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5_moe", "gpt_oss"])
def test_graph_runner_serves_decode_steps_under_async_scheduling(tmp_path: Path,
                                                                  family: str) -> None:
    """``ModelRunner`` with a ``HybridGraphRunner`` (its graphs replaced by eager reruns over
    the same static buffers, torch attention): pure-decode steps go to it, chained by async
    scheduling (their tokens carried on the device), with the greedy tokens of the eager
    engine over both turns (the follow-up resuming from a checkpoint)."""
    from pensieve.backends.cuda_hybrid import CudaHybridBuilder
    from pensieve.backends.cuda_hybrid_graphs import HybridGraphRunner

    ckpt = FAMILIES[family](tmp_path)
    plain = _turns(_engine(ckpt))
    cfg = EngineConfig(device="cpu", dtype=torch.float32, context_length=128, block_size=BLOCK,
                       max_num_seqs=SEATS, max_num_batched_tokens=64,
                       state_checkpoint_interval=INTERVAL, async_scheduling=True)
    engine = torch_engine(build_model(ckpt, cfg), ckpt.args, ckpt.tokenizer, cfg)
    runner, caches = engine.runner, engine.runner.hybrid
    builder = CudaHybridBuilder(caches.k_caches, caches.v_caches, caches.layer_group,
                                [g.window for g in caches.plan.paged], BLOCK,
                                torch.device("cpu"), num_sms=4)
    graphs = HybridGraphRunner(runner.model, caches, builder, SEATS, 128 // BLOCK)
    carried = []
    for b in graphs.buckets:
        attention = graphs.static.torch_attention(b)
        step = (lambda b=b, a=attention: graphs.static.forward(runner.model, b, a))
        with torch.inference_mode():
            graphs._graphs[b] = EagerGraph(step, step())
        graphs._outputs[b] = graphs._graphs[b].out
    fill = graphs.static.fill
    graphs.static.fill = lambda chunks, bucket, ids=None, rows=(): (
        carried.append(ids is not None and any(r >= 0 for r in rows)) or
        fill(chunks, bucket, ids, rows))
    runner.hybrid_graphs = graphs
    assert _turns(engine) == plain
    assert graphs.replays >= 10 and sum(carried) >= 5, (graphs.replays, sum(carried))
