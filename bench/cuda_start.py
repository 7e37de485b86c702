"""Where a CUDA start's weight conversion goes: a GGUF → the CUDA-planned model, phase by phase.

The same steps ``pensieve serve --device cuda`` takes (``cli/serve_torch.py::load_model``), timed
one by one: ``read`` (the GGUF opened and every kept tensor turned into its code form,
``load_checkpoint(keep_int4=True)``), ``plan`` (``plan_weights``: codes onto modules, tables,
experts), ``place`` (``place_weights``: the CUDA layers' buffers built), ``move`` (``.to``
the device and dtype) and, on a GPU, ``tune`` (fused layers, ``prepare_for_cuda``'s timed
kernel plans, the Q6_K route check). ``--device cpu`` builds the CUDA model on this CPU (the
layers' buffers exactly as on a GPU, as ``tests/unit/test_cuda_weight_bytes.py`` does): the host
part of a start without a GPU. ``--convert-on`` picks where the codes are converted
(``load_checkpoint(device=...)``): ``cuda`` moves each tensor's GGUF bytes to the GPU first;
without it they are decoded on the host through the map (``PENSIEVE_CONVERT_ON=cpu``).

    python -m bench.cuda_start /tmp/q3moe.gguf --device cpu                     # host part, here
    python -m bench.cuda_start /tmp/q3moe.gguf --device cuda --convert-on cuda  # as serve now
    python -m bench.cuda_start /tmp/q3moe.gguf --device cuda                    # host decode

``--threads`` sets torch's intra-op threads; ``--profile`` prints cProfile's heaviest calls.
``bench/gpu_start.sh`` runs it on the GPU machine for the three random files of
``gpu_session.sh``: decoded on the GPU with a fresh and a warm tune cache, and on the host.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(path: str, device: str, convert_on: str | None, dtype: torch.dtype
          ) -> tuple[torch.nn.Module, dict[str, float]]:
    """The CUDA-planned model of ``path`` and each phase's seconds (wall, and ``cpu_*``: this
    process's CPU time, steadier on a shared machine)."""
    from pensieve.backends.torch_backend import place_weights, plan_weights
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.registry import load_checkpoint
    from pensieve.models.registry import model_class

    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    config = EngineConfig(device="cuda", dtype=dtype, context_length=4096)
    t, c = time.perf_counter(), time.process_time()
    kw = {} if convert_on is None else {"device": convert_on}
    ckpt = load_checkpoint(path, dtype=dtype, keep_int4=True, **kw)
    times["read"], cpu["read"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    with torch.device("meta"):
        model = model_class(ckpt.args)(ckpt.args, max_positions=4096)
    planned = plan_weights(ckpt, config, packed=getattr(model, "PACKED", {}))
    ckpt = replace(ckpt, weights={}, int4={}, int8={})  # as serve: the plan holds the codes
    tune_int4 = bool(planned.modules) and (model.fast_paths.cuda_fused_layers
                                           or bool(planned.experts))
    times["plan"], cpu["plan"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    place_weights(model, ckpt.args, config, planned)
    del planned, ckpt
    times["place"], cpu["place"] = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    model = model.to(device=device, dtype=dtype).eval()
    if device == "cuda":
        torch.cuda.synchronize()
    times["move"], cpu["move"] = time.perf_counter() - t, time.process_time() - c
    if device == "cuda":
        from pensieve.backends.torch_backend import finish_on_cuda

        t, c = time.perf_counter(), time.process_time()
        finish_on_cuda(model, config, tune_int4)
        torch.cuda.synchronize()
        times["tune"], cpu["tune"] = time.perf_counter() - t, time.process_time() - c
    times["total"] = sum(times.values())
    times.update({f"cpu_{k}": v for k, v in cpu.items()})
    times["cpu_total"] = sum(cpu.values())
    return model, times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--convert-on", default=None,
                   help="decode the tensors on this device (load_checkpoint(device=...)); "
                        "default: on the host through the map, as PENSIEVE_CONVERT_ON=cpu")
    p.add_argument("--label", default="", help="a name for the run in the JSON line")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", default=None, help="append the result as a JSON line here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    _, times = build(a.gguf, a.device, a.convert_on, torch.bfloat16)
    if prof:
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(a.top)
        print(out.getvalue())
    size = Path(a.gguf).stat().st_size / 1e9
    row = {"label": a.label, "file": Path(a.gguf).name, "gb": round(size, 3), "device": a.device,
           "convert_on": a.convert_on, "threads": torch.get_num_threads(),
           **{k: round(v, 2) for k, v in times.items()}, "peak_rss_gib": round(peak_rss_gib(), 2)}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
