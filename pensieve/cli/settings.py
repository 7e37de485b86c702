"""Flags + environment → one frozen settings object, validated once."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pensieve.api.batches.config import DEFAULT_BATCH_DIR, BatchConfig
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import DEFAULT_DRY, DryParams
from pensieve.models.args import ModelArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHTS = ("auto", "float", "int4")  # --weights: backends/kernel_choice.choose resolves it
BACKENDS = ("auto", "torch", "mlx", "upstream")  # --backend (upstream: cli/serve_upstream.py,
# mlx: cli/serve_mlx.py; auto: mlx on Apple silicon where installed, else torch)


@dataclass(frozen=True)
class ServeSettings:
    model_path: Path
    host: str
    port: int
    api_keys: tuple[str, ...]
    served_name: str | None
    aliases: Mapping[str, str]
    engine: EngineConfig
    context_length: int | None  # None → the model's own (or trained × rope_scale)
    threads: int | None = None
    rope_scale: float | None = None  # None → scale only if context_length needs it
    rope_type: str = "yarn"
    default_temperature: float = 1.0
    default_top_p: float = 1.0  # the model's sampling defaults (store manifest,
    default_top_k: int = 0  # generation_config.json or catalogue) for requests that send none
    weights: str = "auto"  # "auto" | "float" | "int4" (4-bit GGUF weights on the CPU kernels)
    dry: DryParams | None = None  # the loop guard of every request; None → off
    request_timeout_s: float | None = 3600.0  # a generation's deadline from its arrival; None → none
    header_timeout_s: float = 30.0  # a connection's request head must be complete within this
    batches: BatchConfig = field(default_factory=BatchConfig)  # Message Batches: folder, concurrency
    backend: str = "torch"  # what runs the model, --backend resolved: "torch" | "mlx" | "upstream"

    def context_plan(self, args: ModelArgs) -> ContextPlan:
        return plan_context(args, self.context_length, self.rope_scale, self.rope_type)


# Architectures whose RoPE (pensieve/models/rope.py) takes an HF ``rope_scaling`` override.
ROPE_SCALABLE = frozenset({"llama"})
ROPE_TYPES = ("yarn", "linear")


@dataclass(frozen=True)
class ContextPlan:
    """The context a server runs with and the RoPE scaling that reaches it.

    ``rope_scaling`` None → the model's own RoPE, unchanged; otherwise the HF-shaped block to
    put on ``ModelArgs`` before the model is built. ``note`` says what was extended, for the log.
    """

    context_length: int
    rope_scaling: dict[str, Any] | None = None
    note: str | None = None

    def apply(self, args: ModelArgs) -> ModelArgs:
        if self.rope_scaling is None:
            return args
        return replace(args, rope_scaling=dict(self.rope_scaling),
                       max_position_embeddings=self.context_length)


def plan_context(args: ModelArgs, requested: int | None, rope_scale: float | None,
                 rope_type: str = "yarn") -> ContextPlan:
    """Context length and RoPE scaling for ``--context-length`` / ``--rope-scale``.

    Up to the trained length nothing changes. Beyond it RoPE scaling is applied
    (``rope_scale`` given, or the factor ``requested / trained`` — a warning, not a refusal);
    the new context is ``requested`` or ``trained × rope_scale``.
    """
    trained = args.max_position_embeddings
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"--rope-type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
    if rope_scale is not None and rope_scale < 1:
        raise ValueError(f"--rope-scale must be at least 1, got {rope_scale}")
    if rope_scale is None or rope_scale == 1:
        if requested is None or requested <= trained:
            return ContextPlan(requested or trained)
        factor = requested / trained
        reason = f"--context-length {requested} exceeds the trained {trained}"
    else:
        factor = rope_scale
        reason = f"--rope-scale {rope_scale:g}"
        if requested is not None and requested > trained * factor:
            raise ValueError(
                f"--context-length {requested} exceeds {trained} × --rope-scale {factor:g}: "
                f"raise --rope-scale to {requested / trained:g} or leave it out"
            )
    _check_scalable(args)
    context = requested or int(trained * factor)
    scaling = {"rope_type": rope_type, "factor": float(factor),
               "original_max_position_embeddings": trained}
    note = (f"{reason}: {rope_type} RoPE scaling x{factor:g}, context {trained} -> {context} "
            "tokens (long-range quality may degrade; see docs/context.md)")
    return ContextPlan(context, scaling, note)


def _check_scalable(args: ModelArgs) -> None:
    if args.architecture not in ROPE_SCALABLE:
        raise ValueError(f"RoPE scaling is not supported for architecture {args.architecture!r}; "
                         f"keep --context-length at most {args.max_position_embeddings}")
    if args.rope_scaling or "rope_freq_factors" in args.extra:
        kind = (args.rope_scaling or {}).get("rope_type", "frequency-factor")
        raise ValueError(
            f"the model already uses {kind} RoPE scaling to reach {args.max_position_embeddings} "
            "tokens; scaling it further is not supported"
        )


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str]) -> ServeSettings:
    from pensieve.loaders.default_model import default_model_path

    if any(not key.strip() for key in ns.api_key):
        raise ValueError("--api-key must not be empty: pass a non-empty key, or leave the flag "
                         "out to serve without authentication on loopback")
    model, sampling, store_name = _model_source(ns, env, default_model_path)
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = ns.dtype or default_dtype(device)
    keys = tuple(ns.api_key) + tuple(k for k in env.get("PENSIEVE_API_KEY", "").split(",") if k)
    aliases = {}
    for item in ns.alias:
        name, sep, target = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--alias wants NAME=MODEL, got {item!r}")
        aliases[name] = target
    kv_name = getattr(ns, "kv_dtype", None) or ("float16" if device == "cpu" else dtype_name)
    batched = getattr(ns, "max_num_batched_tokens", None)
    for flag, value in (("--max-num-batched-tokens", batched), ("--max-num-seqs", ns.max_num_seqs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    engine = EngineConfig(
        device=device,
        dtype=DTYPES[dtype_name],
        kv_dtype=DTYPES[kv_name],  # CPU: float16 halves the cache's memory and bytes read
        # CUDA: a step's cost barely grows with its rows up to dozens (the weights are read once),
        # so 32 streams share a GPU where 8 left the 9th to 32nd waiting (H100, 30B-A3B: 8 and
        # 32 streams both 700 tok/s at 8); the CPU's steps grow with their rows
        max_num_seqs=ns.max_num_seqs or (32 if device == "cuda" else 8),
        # CPU: 512 keeps other streams decoding every ~1.7 s during a long prefill; served
        # 1.5k-token prefill measured no faster at 2048 (243–292 tok/s both, run to run)
        max_num_batched_tokens=batched or (2048 if device == "cuda" else 512),
        async_scheduling={"on": True, "off": False}.get(getattr(ns, "async_scheduling", "auto")),
        gpu_memory_fraction=_fraction(getattr(ns, "gpu_memory_fraction", None)),
        kv_cache_bytes=_kv_bytes(getattr(ns, "kv_cache_gb", None)),
        keep_dense_weights=bool(getattr(ns, "keep_dense_weights", False)),
        max_waiting=_at_least(getattr(ns, "max_waiting", None), 64, 1, "--max-waiting"),
        grammar_timeout_s=_positive(getattr(ns, "grammar_timeout", None), 5.0, "--grammar-timeout", zero=False),
        state_checkpoint_interval=_at_least(getattr(ns, "state_checkpoint_interval", None), 512, 0,
                                            "--state-checkpoint-interval"),
        state_checkpoints=getattr(ns, "state_checkpoints", None),
    )
    request_timeout = _positive(getattr(ns, "request_timeout", None), 3600.0, "--request-timeout")
    header_timeout = _positive(getattr(ns, "header_timeout", None), 30.0, "--header-timeout", zero=False)
    if ns.context_length is not None and ns.context_length < 16:
        raise ValueError("--context-length must be at least 16")
    rope_scale = getattr(ns, "rope_scale", None)
    weights = getattr(ns, "weights", None) or env.get("PENSIEVE_WEIGHTS") or "auto"
    if weights not in WEIGHTS:
        raise ValueError(f"--weights / PENSIEVE_WEIGHTS must be one of {', '.join(WEIGHTS)}, "
                         f"got {weights!r}")
    if rope_scale is not None and rope_scale < 1:
        raise ValueError(f"--rope-scale must be at least 1, got {rope_scale:g}")
    dry = dry_params(getattr(ns, "dry_multiplier", None), getattr(ns, "dry_allowed_length", None))
    if dry is None and getattr(ns, "dry_multiplier", None) is None and sampling.repeat_guard:
        dry = replace(DEFAULT_DRY, multiplier=sampling.repeat_guard)  # the model's loop guard
    flag_temperature = getattr(ns, "default_temperature", None)
    return ServeSettings(
        model_path=model, host=ns.host, port=ns.port, api_keys=keys,
        served_name=ns.served_name or store_name,
        aliases=aliases, engine=engine, context_length=ns.context_length, threads=ns.threads,
        rope_scale=rope_scale, rope_type=getattr(ns, "rope_type", None) or "yarn",
        default_temperature=(flag_temperature if flag_temperature is not None
                             else 1.0 if sampling.temperature is None else sampling.temperature),
        default_top_p=1.0 if sampling.top_p is None else sampling.top_p,
        default_top_k=sampling.top_k or 0, weights=weights, dry=dry,
        request_timeout_s=request_timeout or None,  # --request-timeout 0: no deadline
        header_timeout_s=header_timeout,
        batches=batch_config(ns, env),
        backend=resolve_backend(getattr(ns, "backend", None) or "auto"),
    )


def _fraction(value: float | None) -> float:
    if value is None:
        return 0.9
    if not 0 < value <= 1:
        raise ValueError(f"--gpu-memory-fraction must be in (0, 1], got {value:g}")
    return value


def _kv_bytes(gb: float | None) -> int | None:
    if gb is None:
        return None
    if not gb > 0:
        raise ValueError(f"--kv-cache-gb must be positive, got {gb:g}")
    return int(gb * 2**30)


X86_64 = frozenset({"x86_64", "amd64"})


def default_dtype(device: str, machine: str | None = None) -> str:
    """The weights' float type when ``--dtype`` is not given: bfloat16 on CUDA, and on a CPU
    without the x86-64 kernels (Linux arm64, a Mac without MLX), where float32 would read
    twice the bytes per token for no gain; float32 on x86-64 CPUs, whose compiled kernels and
    oneDNN paths take float32 activations."""
    if device != "cpu":
        return "bfloat16" if device == "cuda" else "float32"
    machine = (machine or platform.machine()).lower()
    return "float32" if machine in X86_64 else "bfloat16"


def resolve_backend(requested: str, *, apple_silicon: bool | None = None,
                    mlx_installed: bool | None = None) -> str:
    """``--backend``: ``auto`` is mlx on Apple silicon where mlx and mlx-lm are installed
    (``pip install "pensieve[mlx]"``), else torch; ``mlx`` without them is an error."""
    from pensieve.backends.mlx_backend import apple_silicon as on_apple, mlx_available

    if requested not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested in ("torch", "upstream"):
        return requested
    installed = mlx_available() if mlx_installed is None else mlx_installed
    if requested == "mlx":
        if not installed:
            raise ValueError('--backend mlx needs mlx and mlx-lm: pip install "pensieve[mlx]"')
        return "mlx"
    apple = on_apple() if apple_silicon is None else apple_silicon
    return "mlx" if apple and installed else "torch"


def batch_config(ns: argparse.Namespace, env: Mapping[str, str]) -> BatchConfig:
    """``--batch-dir`` (or ``PENSIEVE_BATCH_DIR``, default ``~/.pensieve/batches``) and
    ``--batch-concurrency``."""
    folder = getattr(ns, "batch_dir", None) or env.get("PENSIEVE_BATCH_DIR") or DEFAULT_BATCH_DIR
    concurrency = _at_least(getattr(ns, "batch_concurrency", None), 4, 1, "--batch-concurrency")
    return BatchConfig(directory=Path(folder), concurrency=concurrency)


def _model_source(ns: argparse.Namespace, env: Mapping[str, str], default_path: Any
                  ) -> tuple[Path, Any, str | None]:
    """(path to load, its sampling defaults, its store name or None) for ``--model``: a path,
    or a name in the model store (``pensieve pull``); none → the default model."""
    from pensieve.store import ModelNotPulled, StoreError, resolve_manifest
    from pensieve.store.sampling import model_defaults
    from pensieve.store.store import store_from

    if not ns.model:
        path = default_path()
        return path, model_defaults(path), None
    try:
        path, manifest = resolve_manifest(ns.model, store_from(getattr(ns, "store", None), env))
    except ModelNotPulled as exc:
        raise ValueError(str(exc)) from None
    except StoreError:  # not a store name either: the loader says what is wrong with the path
        path, manifest = Path(ns.model).expanduser(), None
    if manifest is None:
        return path, model_defaults(path), None
    return path, manifest.params.over(model_defaults(path)), manifest.name


def _at_least(value: int | None, default: int, least: int, flag: str) -> int:
    if value is not None and value < least:
        raise ValueError(f"{flag} must be at least {least}, got {value}")
    return default if value is None else value


def _positive(value: float | None, default: float, flag: str, zero: bool = True) -> float:
    if value is not None and (value < 0 or value == 0 and not zero):
        raise ValueError(f"{flag} must be {'≥ 0' if zero else 'positive'}, got {value:g}")
    return default if value is None else value


def dry_params(multiplier: float | None, allowed_length: int | None) -> DryParams | None:
    """The loop guard ``--dry-multiplier`` / ``--dry-allowed-length`` ask for; None (off) by
    default: it also penalises legitimately repeated text, such as similar lines of code."""
    if multiplier is not None and multiplier < 0:
        raise ValueError(f"--dry-multiplier must be ≥ 0, got {multiplier:g}")
    if allowed_length is not None and allowed_length < 1:
        raise ValueError(f"--dry-allowed-length must be ≥ 1, got {allowed_length}")
    if not multiplier:
        if allowed_length is not None:
            raise ValueError("--dry-allowed-length needs --dry-multiplier above 0")
        return None
    return replace(DEFAULT_DRY, multiplier=multiplier,
                   allowed_length=allowed_length or DEFAULT_DRY.allowed_length)
