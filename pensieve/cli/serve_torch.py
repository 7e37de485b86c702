"""`pensieve serve` on the PyTorch backend: the weight kernels chosen, the checkpoint loaded
(or its packed CPU copy mapped), the context fitted, the engine built and warmed up."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pensieve.cli.errors import StartupError
from pensieve.cli.progress_line import Phase
from pensieve.cli.settings import ServeSettings

if TYPE_CHECKING:
    from torch import nn

    from pensieve.backends.kernel_choice import WeightChoice
    from pensieve.backends.packed_cache import PackedEntry
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.engine import Engine
    from pensieve.loaders.checkpoint import Checkpoint
    from pensieve.models.args import ModelArgs

log = logging.getLogger("pensieve")


def load_torch_engine(settings: ServeSettings) -> tuple[Engine, Checkpoint, Callable[[], None] | None]:
    """The running-ready engine of ``settings.model_path``, its checkpoint (tokenizer,
    template, name; no weights) and the callable that writes its packed copy, if one is due."""
    from pensieve.backends import triton_compiles
    from pensieve.backends.cpu_memory import bound_heap, release_free_memory
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.loaders.checkpoint import CheckpointError

    on_cpu = torch.device(settings.engine.device).type == "cpu"
    if on_cpu:
        bound_heap()  # before loading: see backends/cpu_memory.py
    else:
        from pensieve.backends.cuda_allocator import use_expandable_segments

        use_expandable_segments(os.environ)  # before the load allocates: see the module
        triton_compiles.watch()  # counts start-up's compiles; warns of any once serving
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with Phase("choosing the weight kernels (the first start compiles them)"):
        choice = choose_weights(settings)
    entry = packed_entry(settings, choice) if on_cpu else None
    try:
        with Phase(f"loading {Path(settings.model_path).name}"):
            ckpt, engine_cfg, model, write_cache = load_model(settings, choice, entry)
    except CheckpointError as exc:
        raise StartupError(str(exc)) from exc
    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, engine_cfg)
    del model
    if torch.device(engine_cfg.device).type == "cuda":  # CPU start-up time matters more
        from pensieve.backends.model_runner import log_gpu_memory_use
        from pensieve.engine.warm_up import warm_up

        steps, seconds = warm_up(engine)
        log.info("warmed up the step shapes that compile kernels: %d steps in %.1f s", steps, seconds)
        torch.cuda.empty_cache()  # the warm-up's temporaries: what serving holds is what shows
        log_gpu_memory_use(torch.device(engine_cfg.device), "after the warm-up")
        if triton_compiles.watch():
            count, spent = triton_compiles.serving()
            log.info("Triton compiled %d kernels at start (%.1f s); a compile while serving is a "
                     "shape the warm-up missed and is logged as a warning", count, spent)
    if on_cpu:
        release_free_memory()
    return engine, ckpt, write_cache


def choose_weights(settings: ServeSettings) -> WeightChoice:
    """``--weights`` resolved for this device (kernels built or loaded, timed); never raises
    for a missing compiler or CPU feature: that resolves to float weights, with the reason
    logged by the kernel loader."""
    from pensieve.backends.kernel_choice import choose

    started = time.perf_counter()
    choice = choose(settings.weights, device=settings.engine.device)
    log.info("--weights %s → %s [%.0f ms]", settings.weights, choice.describe(),
             (time.perf_counter() - started) * 1e3)
    return choice


def packed_entry(settings: ServeSettings, choice: WeightChoice) -> PackedEntry | None:
    """The packed-weights cache entry of a GGUF model on the CPU kernels, else None."""
    from pensieve.backends import packed_cache
    from pensieve.loaders.checkpoint import CheckpointError
    from pensieve.loaders.registry import checkpoint_format

    if not (choice.keep_int4 and choice.kernel == "cpu_quant"):
        return None
    try:
        if checkpoint_format(Path(settings.model_path).expanduser()) != "gguf":
            return None
    except CheckpointError:
        return None
    return packed_cache.entry_for(
        settings.model_path, dtype=settings.engine.dtype,
        choice=f"{choice.kernel}/{choice.keep_int4}/{choice.int8_lm_head}/{settings.weights}")


def load_model(settings: ServeSettings, choice: WeightChoice, entry: PackedEntry | None
               ) -> tuple[Checkpoint, EngineConfig, nn.Module, Callable[[], None] | None]:
    """(checkpoint without its weights, engine config, built model, a callable that writes
    the packed cache or None). With a packed copy in ``entry`` the GGUF's tensors are not read:
    the model maps the copy; without one (or where it fails) the GGUF is converted and, on the
    CPU kernels, a snapshot of the built model is kept for ``entry``."""
    from pensieve.backends import packed_cache
    from pensieve.backends.torch_backend import build_model, plan_weights
    from pensieve.loaders.registry import load_checkpoint
    from pensieve.models.registry import model_class

    hit = packed_cache.read_packed(entry) if entry is not None else None
    on_host = torch.device(settings.engine.device).type == "cpu"
    started = time.perf_counter()
    ckpt = load_checkpoint(settings.model_path, dtype=settings.engine.dtype,
                           keep_int4=choice.keep_int4, tensors=hit is None,
                           tokenizer=None if hit is None else hit.tokenizer,
                           device=convert_on(settings),
                           # a GPU server decoding on its host: every core (the CPU server's
                           # busy cores: one)
                           host_threads=1 if on_host else torch.get_num_threads())
    ckpt, engine_cfg = fit_context(settings, ckpt)
    if hit is not None:
        engine_cfg = replace(engine_cfg, int8_lm_head=bool(hit.meta["int8_lm_head"]))
        try:
            model = build_model(ckpt, engine_cfg, hit.weights)
        except Exception as exc:  # noqa: BLE001 - a cache: convert the GGUF instead
            log.warning("packed weights %s did not build (%s): converting the GGUF", entry.path, exc)
            packed_cache.discard(entry)
            return load_model(settings, choice, entry)
        packed_cache.drop_lookup_pages(model, hit)
        log.info("weights mapped from %s [%.2f s]", entry.path, time.perf_counter() - started)
        return replace(ckpt, weights={}, int4={}, int8={}), engine_cfg, model, None
    engine_cfg = replace(engine_cfg, int8_lm_head=_int8_head(settings, choice, ckpt))
    planned = plan_weights(ckpt, engine_cfg, packed=getattr(model_class(ckpt.args), "PACKED", {}))
    ckpt = replace(ckpt, weights={}, int4={}, int8={})  # the model holds what it needs of them
    model = build_model(ckpt, engine_cfg, planned)
    log.info("weights converted from the GGUF [%.2f s]", time.perf_counter() - started)
    snap = None
    if entry is not None:
        snap = packed_cache.snapshot(model, planned, {"int8_lm_head": engine_cfg.int8_lm_head},
                                     ckpt.tokenizer)
        if snap is None:
            log.info("packed weights: this model's layers are not all cacheable; not written")
    del planned
    write = None if snap is None else (lambda: packed_cache.write_in_background(entry, snap))
    return ckpt, engine_cfg, model, write


# the decoded forms a GPU holds before the layers are built, per byte of the file (Q4_K 1.56,
# Q6_K 1.46, Q4_0 1.11: codes, float16 and exact float32 scales), with room for one tensor's
# temporaries
DECODED_PER_FILE_BYTE = 1.6
DECODE_HEADROOM = 2 << 30


def convert_on(settings: ServeSettings) -> str | None:
    """Where a GGUF's tensors are decoded: on the GPU that will hold them (their bytes copied
    there as they are) where its free memory takes the decoded forms, else on the host (as
    with ``PENSIEVE_CONVERT_ON=cpu``), which is slower but needs only the built layers' room."""
    device = torch.device(settings.engine.device)
    if device.type != "cuda" or os.environ.get("PENSIEVE_CONVERT_ON", "") == "cpu":
        return None
    path = Path(settings.model_path).expanduser()
    if not path.is_file():  # an HF folder: its loader reads on the host
        return None
    need = path.stat().st_size * DECODED_PER_FILE_BYTE + DECODE_HEADROOM
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        log.info("decoding the GGUF on the host: the GPU's %.1f GiB free take not its decoded "
                 "forms (%.1f GiB)", free / 2**30, need / 2**30)
        return None
    return str(device)


def _int8_head(settings: ServeSettings, choice: WeightChoice, ckpt: Checkpoint) -> bool:
    """int8 output layer where chosen; under ``auto`` only for a model that came quantised
    (a float checkpoint keeps its float head unless ``--weights int4`` asks otherwise)."""
    if choice.int8_lm_head and settings.weights == "auto" and not ckpt.int4:
        log.info("float checkpoint: lm_head stays float under --weights auto")
        return False
    return choice.int8_lm_head


def fit_context(settings: ServeSettings, ckpt: Checkpoint) -> tuple[Checkpoint, EngineConfig]:
    """The checkpoint with any RoPE scaling the context needs, and the engine config."""
    try:
        plan = settings.context_plan(ckpt.args)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    if plan.note:
        log.warning("%s", plan.note)
        ckpt = replace(ckpt, args=plan.apply(ckpt.args), context_length=plan.context_length)
    engine_cfg = replace(settings.engine, context_length=plan.context_length)
    per_token = kv_bytes_per_token(ckpt.args, engine_cfg.kv_dtype or engine_cfg.dtype)
    log.info("context %d tokens; KV cache %.1f KiB/token, %.2f GiB for one full context",
             plan.context_length, per_token / 1024, per_token * plan.context_length / 2**30)
    return ckpt, engine_cfg


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
    """Keys and values of every attention layer for one token, as the family's cache layout
    declares them (latent layers K only; recurrent layers keep a fixed state, no per-token
    cache; a windowed layer's count is its peak, not what it holds past its window)."""
    from pensieve.models.cache_spec import PagedKV
    from pensieve.models.registry import UnsupportedArchitectureError, family

    try:
        layout = family(args.architecture).cache_layout(args)
    except UnsupportedArchitectureError:
        return 2 * args.num_layers * args.num_kv_heads * args.head_dim * dtype.itemsize
    return sum(s.token_elements() for s in layout if isinstance(s, PagedKV)) * dtype.itemsize
