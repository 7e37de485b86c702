"""Count the torch ops one engine step runs per layer kind on the hybrid families (issue 15).

A decode step's cost on a GPU is, past the weights' bytes, its kernel count × a few µs (graphs)
or × ~10-20 µs (eager Python + launch). The CPU path runs the same model code as the CUDA one
(the norms, projections, gates, router, the Gated DeltaNet torch path): its ATen op count per
layer is a fair proxy for the CUDA launches of the parts that stay torch, and host syncs
(``aten._local_scalar_dense``, ``nonzero``: ``.item()``, ``.tolist()``, boolean indexing) are
counted apart. Where CUDA differs: attention runs ``cuda_hybrid``'s Triton kernels (the CPU
runs the per-sequence SDPA loop, counted under ``attn``), the experts ``cuda_moe``'s (the CPU
loops over the hit experts, counted under ``mlp.experts``), the Gated DeltaNet step
``cuda_gdn``'s two Triton kernels, the (1 + w) norms, the routers (softmax, sigmoid,
gpt-oss's) and the MLA head glue (``cuda_hybrid_mla_rope``) one each (``--kernels``: run here under the Triton interpreter; their launches are counted as
``triton``, not torch ops).

Tiny random checkpoints of each family (``tests/helpers/tiny_hybrid_checkpoints.py``): op
counts per layer do not depend on the widths; the real shapes' layer mix multiplies them
(Qwen3.6-35B-A3B: 30 Gated DeltaNet + 10 gated attention layers; gpt-oss-20b: 12 sliding + 12
full; GLM-4.7-Flash: 47 MLA layers, the first dense).

    .venv/bin/python -m bench.hybrid_op_count [--kernels] [--families qwen3_5_moe ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.item"}
REAL_MIX = {"qwen3_5_moe": "30 gdn + 10 gated_attn", "gpt_oss": "12 sliding + 12 full",
            "glm4_moe_lite": "47 mla (1 dense MLP)", "qwen3_next": "36 gdn + 12 gated_attn"}


class Counter(TorchDispatchMode):
    """ATen ops by the label on top of ``stack`` (``outside`` when none)."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.triton: collections.Counter[str] = collections.Counter()
        self.on = False  # inside ``with counter`` (the Triton launches count only then)

    def __enter__(self):  # noqa: ANN204
        self.on = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.on = False
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        label = self.stack[-1] if self.stack else "outside"
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        self.ops[label] += 1
        if name in SYNCS or name.endswith("_local_scalar_dense"):
            self.syncs[label] += 1
        return func(*args, **(kwargs or {}))


def layer_kind(layer: torch.nn.Module) -> str:
    if getattr(layer, "linear", False):
        return "gdn"
    attn = getattr(layer, "self_attn", None)
    name = type(attn).__name__
    if name == "GatedAttention":
        return "gated_attn"
    if name == "MLAttention":
        return "mla"
    if getattr(attn, "window", None):
        return "sliding"
    return "full"


def hook(model: torch.nn.Module, counter: Counter) -> dict[str, int]:
    """Label every decoder layer's parts (kind.child[.grandchild]); returns layers per kind."""
    kinds: collections.Counter[str] = collections.Counter()
    for layer in model.model.layers:
        kind = layer_kind(layer)
        kinds[kind] += 1
        for path, mod in layer.named_modules():
            if not path or path.count(".") > 1:
                continue
            label = f"{kind}.{path.replace('linear_attn', 'attn').replace('self_attn', 'attn')}"
            mod.register_forward_pre_hook(lambda m, a, label=label: counter.stack.append(label))
            mod.register_forward_hook(lambda m, a, o: (counter.stack.pop(), None)[1])
    return dict(kinds)


ACTIVE: list[Counter] = []  # the counter the patched launches report to


class Launch:
    """A Triton kernel whose launches count as ``triton`` and run outside the mode."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            if ACTIVE and ACTIVE[-1].on:
                c = ACTIVE[-1]
                c.triton[c.stack[-1] if c.stack else "outside"] += 1
            with _disable_current_modes():
                return self.fn[grid](*args, **kwargs)
        return launch


def count_triton() -> None:
    """Patch the hybrid kernels (``cuda_gdn_kernels``, ``cuda_offset_norm``, ``cuda_router``,
    the fused routers of ``cuda_router_kernels``) to count their launches."""
    from pensieve.backends import cuda_gdn_kernels as k, cuda_offset_norm, cuda_router

    for name in ("conv_step", "delta_step"):
        if not isinstance(getattr(k, name), Launch):
            setattr(k, name, Launch(getattr(k, name)))
    for mod in (cuda_offset_norm, cuda_router):
        if not isinstance(mod._kernel(), Launch):
            launch = Launch(mod._kernel())
            mod._kernel = lambda launch=launch: launch
    from pensieve.backends import cuda_hybrid_mla_rope

    for mod, name in ((cuda_router, "_sigmoid_kernel"), (cuda_router, "_topk_softmax_kernel"),
                      (cuda_hybrid_mla_rope, "_kernel")):
        if not isinstance(getattr(mod, name)(), Launch):
            launch = Launch(getattr(mod, name)())
            setattr(mod, name, lambda launch=launch: launch)
    from pensieve.backends import cuda_router_kernels  # the fused routers' GEMM + selection

    for name in ("fused_softmax", "fused_sigmoid", "fused_topk_softmax"):
        if not isinstance(getattr(cuda_router_kernels, name), Launch):
            setattr(cuda_router_kernels, name, Launch(getattr(cuda_router_kernels, name)))


def engine(ckpt: Any, seqs: int, gdn_kernel: bool) -> Any:
    from pensieve.backends.torch_backend import build_model, torch_engine
    from pensieve.engine.config import EngineConfig

    cfg = EngineConfig(context_length=512, block_size=4, max_num_seqs=seqs,
                       max_num_batched_tokens=256, state_checkpoint_interval=16,
                       dtype=torch.bfloat16)
    model = build_model(ckpt, cfg)
    eng = torch_engine(model, ckpt.args, ckpt.tokenizer, cfg)
    if gdn_kernel:  # what a CUDA hybrid runner installs (``ModelRunner._init_hybrid``)
        from pensieve.backends import cuda_gdn, cuda_offset_norm, cuda_router

        cuda_gdn.install(model)
        cuda_offset_norm.install(model)
        cuda_router.install(model)
        from pensieve.backends import cuda_hybrid_mla_rope

        cuda_hybrid_mla_rope.install(model)
    return eng, model


def measure(name: str, make: Any, root: Path, gdn_kernel: bool) -> list[str]:
    from pensieve.engine.types import SamplingParams

    ckpt = make(root)
    rows = []
    for label, seqs, follow in (("decode b=1", 1, False), ("decode b=8", 8, False),
                                ("follow-up chunk (40 new on a 64 prefix)", 1, True)):
        eng, model = engine(ckpt, seqs, gdn_kernel)
        counter = Counter()
        ACTIVE[:] = [counter]
        kinds = hook(model, counter)
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        base = list(range(5, 69))
        for i in range(seqs):
            eng.add_request(f"r{i}", [(t + 7 * i) % 200 + 3 for t in base], params)
        while eng.has_work():
            eng.step()
        if follow:  # the prefix hits the cache; the new tokens prefill in one chunk
            eng.add_request("f", [(t % 200) + 3 for t in base] + list(range(100, 140)),
                            params)
        else:
            for i in range(seqs):
                eng.add_request(f"d{i}", [(t + 11 * i) % 200 + 3 for t in base[:20]], params)
            eng.step()  # their prefill
        with counter:
            eng.step()  # the step counted: a decode (or the follow-up's prefill)
        while eng.has_work():
            eng.step()
        per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for key, n in counter.ops.items():
            kind, _, part = key.partition(".")
            per[kind][part or "-"] += n
        total = sum(counter.ops.values())
        rows.append(f"\n### {name} — {label} (real mix: {REAL_MIX.get(name, '?')})")
        rows.append(f"step total {total} torch ops, {sum(counter.syncs.values())} host syncs, "
                    f"{sum(counter.triton.values())} Triton launches; outside the layers "
                    f"{counter.ops['outside']} ops, {counter.syncs['outside']} syncs")
        for kind, n in sorted(kinds.items()):
            parts = per.get(kind, collections.Counter())
            layer_ops = sum(parts.values()) / n
            syncs = sum(v for k, v in counter.syncs.items() if k.startswith(kind + ".")) / n
            tri = sum(v for k, v in counter.triton.items() if k.startswith(kind + ".")) / n
            detail = ", ".join(f"{p} {v / n:.0f}" for p, v in sorted(parts.items(),
                                                                      key=lambda x: -x[1]))
            launches = {k.partition(".")[2]: v / n for k, v in counter.triton.items()
                        if k.startswith(kind + ".")}
            if launches:
                detail += "; triton: " + ", ".join(f"{p} {v:.0f}" for p, v in launches.items())
            rows.append(f"- {kind} ×{n}: {layer_ops:.0f} ops/layer ({syncs:.1f} syncs, "
                        f"{tri:.0f} triton): {detail}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", nargs="*", default=["qwen3_5_moe", "gpt_oss", "glm4_moe_lite"])
    p.add_argument("--kernels", dest="gdn_kernel", action="store_true",
                   help="the hybrid Triton kernels a CUDA runner installs (Gated DeltaNet step, "
                        "OffsetRMSNorm, softmax router), under the Triton interpreter here")
    a = p.parse_args()
    if a.gdn_kernel and os.environ.get("TRITON_INTERPRET") != "1" and \
            not torch.cuda.is_available():
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers.tiny_hybrid_checkpoints import FAMILIES

    if a.gdn_kernel:
        count_triton()
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.families:
            for line in measure(name, FAMILIES[name], Path(tmp), a.gdn_kernel):
                print(line, flush=True)


if __name__ == "__main__":
    main()
