"""`pensieve serve`: load a model, build the engine and the API, run uvicorn."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pensieve.cli.serve_upstream import add_upstream_args
from pensieve.cli.progress_line import Phase
from pensieve.cli.settings import BACKENDS, WEIGHTS, ServeSettings, settings_from_args
from pensieve.engine.types import DEFAULT_DRY

if TYPE_CHECKING:
    from pensieve.backends.kernel_choice import WeightChoice
    from pensieve.engine.config import EngineConfig
    from pensieve.loaders.checkpoint import Checkpoint
    from pensieve.models.args import ModelArgs

log = logging.getLogger("pensieve")


class StartupError(Exception):
    """A configuration that must not start (bad flags, unsafe bind, unloadable model)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the Anthropic Messages API")
    p.add_argument("--model", help="GGUF file, HF safetensors folder or a model store name "
                   "(pensieve pull; default: SmolLM2-135M)")
    p.add_argument("--config", metavar="FILE", help="serve several models routed by name, as the TOML "
                   "file lists them (docs/models.md); the other flags are every model's defaults")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--api-key", action="append", default=[], help="require this key (repeatable); "
                   "also PENSIEVE_API_KEY")
    p.add_argument("--served-name", help="model id reported by /v1/models")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=MODEL",
                   help="extra model name that maps to the served model (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="KV cache element type (default: float16 on the CPU, else --dtype)")
    p.add_argument("--context-length", type=int, default=None,
                   help="max tokens per request (default: the model's own); above the trained "
                        "length RoPE scaling is applied (docs/context.md)")
    p.add_argument("--rope-scale", type=float, default=None, metavar="FACTOR",
                   help="extend the context FACTOR times the trained length by RoPE scaling")
    p.add_argument("--rope-type", default="yarn", choices=["yarn", "linear"],
                   help="RoPE scaling method when the context is extended (default: yarn)")
    p.add_argument("--default-temperature", type=float, default=None,
                   help="temperature for requests that send none (Claude Code never does; "
                        "default: the model's own, see `pensieve models`, else 1.0)")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="the model store --model names are looked up in "
                        "(default $PENSIEVE_HOME/models)")
    p.add_argument("--dry-multiplier", type=float, default=None, metavar="M",
                   help="loop guard (off by default; try 0.8 for very small models): a token "
                        "that would extend a sequence the answer already repeated loses "
                        "M·1.75^(n-allowed) logits (docs/sampling.md)")
    p.add_argument("--dry-allowed-length", type=int, default=None, metavar="N",
                   help=f"repeats shorter than N tokens cost nothing (default {DEFAULT_DRY.allowed_length})")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests decoding together in one step (default 8)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens one engine step may process: long prompts are prefilled in "
                        "chunks of up to N tokens while other requests keep decoding between "
                        "chunks (default 2048 on CUDA, 512 on the CPU; smaller keeps their "
                        "streams smoother during a long prefill)")
    p.add_argument("--state-checkpoint-interval", type=int, default=None, metavar="TOKENS",
                   help="hybrid models: tokens between the recurrent-state checkpoints (and the "
                        "sliding windows) kept for prefix hits, a multiple of the block size; a "
                        "follow-up turn recomputes at most this many tokens of its shared prefix "
                        "(default 512; docs/hybrid_cache.md)")
    p.add_argument("--state-checkpoints", type=int, default=None, metavar="N",
                   help="hybrid models: recurrent-state checkpoints kept (LRU; default: as many "
                        "as fit a quarter of the KV budget, at most 256)")
    p.add_argument("--gpu-memory-fraction", type=float, default=None, metavar="F",
                   help="CUDA: the share of the GPU's memory this server may hold in all "
                        "(weights, KV cache, working memory); the KV cache gets what the "
                        "weights and anything else on the GPU leave of it (default 0.9)")
    p.add_argument("--keep-dense-weights", action="store_true",
                   help="CUDA, 4-bit GGUF: also keep tinygemm and dense bf16 copies of the "
                        "weights (several times the memory; the kernels of before)")
    p.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"),
                   help="launch each decode step before the previous step's tokens are read, so "
                        "detokenising and streaming overlap the GPU's work (auto: on CUDA)")
    p.add_argument("--max-waiting", type=int, default=None, metavar="N",
                   help="requests that may wait for a seat; beyond them new requests get 529 "
                        "overloaded_error with retry-after, before their body is read (default 64)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="a generation still running this long after its request arrived is "
                        "stopped with timeout_error and its KV freed (default 3600; 0: none)")
    p.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                   help="a connection whose request line and headers are not complete this long "
                        "after it opened (or after its previous response) is closed (default 30)")
    p.add_argument("--grammar-timeout", type=float, default=None, metavar="SECONDS",
                   help="a tool-call grammar still compiling after this long is replaced by a "
                        "looser one (arguments unchecked), with a warning (default 5)")
    p.add_argument("--batch-dir", default=None, metavar="DIR",
                   help="where Message Batches are kept, so a restart resumes them (default "
                        "~/.pensieve/batches; also PENSIEVE_BATCH_DIR)")
    p.add_argument("--batch-concurrency", type=int, default=None, metavar="N",
                   help="batch requests handed to the engine at once, at a lower priority than "
                        "interactive requests (default 4)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="CPU weights of a 4-bit GGUF: int4 (own AVX2 kernels, int8 output "
                        "layer), float (dequantised), or auto: int4 where it times faster here "
                        "(default; also PENSIEVE_WEIGHTS)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="what runs the model: torch or mlx (in this process; auto: mlx on Apple "
                        "silicon where pensieve[mlx] is installed, else torch), or upstream: vLLM "
                        "or SGLang servers given by --upstream (docs/deployment.md)")
    add_upstream_args(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def check_bind(host: str, api_keys: tuple[str, ...]) -> None:
    """Refuse to expose the server beyond this machine without a key."""
    if api_keys or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise StartupError(
            f"refusing to bind {host} without an API key: pass --api-key or set PENSIEVE_API_KEY"
        )


def run(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(ns, os.environ)
    check_bind(settings.host, settings.api_keys)
    started = time.perf_counter()
    if getattr(ns, "config", None):
        from pensieve.cli.config_file import load_config_file
        from pensieve.cli.serve_pool import build_pool_app

        app, client = build_pool_app(ns, os.environ, load_config_file(ns.config), settings)
    elif getattr(ns, "backend", "auto") == "upstream":
        from pensieve.cli.serve_upstream import build_upstream_app

        app, client = build_upstream_app(settings, ns)
    else:
        app, client = build_app(settings)
    log.info("model %s ready in %.2f s", settings.served_name or "", time.perf_counter() - started)
    return serve_http(app, client, settings.host, settings.port, ns.log_level.lower(),
                      header_timeout_s=settings.header_timeout_s)


SHUTDOWN_GRACE_S = 5  # how long running responses may take to end after SIGTERM/SIGINT


def serve_http(app, client, host: str, port: int, log_level: str,  # noqa: ANN001
               header_timeout_s: float = 30.0) -> int:
    """uvicorn until SIGTERM/SIGINT or the engine's death. On the signal every running
    generation first ends with an error (streams get an ``error`` event, not a cut
    connection), then uvicorn shuts down gracefully (and re-raises the signal). When the engine
    loop dies its callers have already been ended: the server stops and 1 is returned, for a
    supervisor to restart it; a hard exit follows if the graceful shutdown hangs."""
    import uvicorn

    from pensieve.cli.http_protocol import HeaderTimeoutProtocol

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
            if not self.should_exit:
                client.drain("the server is shutting down")
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            http=HeaderTimeoutProtocol.with_timeout(header_timeout_s))
    server = DrainingServer(config)

    def on_death(reason: str) -> None:
        log.critical("the engine stopped (%s): shutting the server down", reason)
        server.should_exit = True
        threading.Thread(target=_exit_later, name="pensieve-exit", daemon=True).start()

    client.on_death = on_death
    try:
        if client.dead_reason is None:
            server.run()
    finally:
        client.shutdown()
    if client.dead_reason is not None and not client.drained:
        log.critical("exiting with status 1: the engine stopped (%s)", client.dead_reason)
        return 1
    return 0


def _exit_later() -> None:
    time.sleep(SHUTDOWN_GRACE_S + 10)
    log.critical("graceful shutdown did not finish; exiting with status 1")
    os._exit(1)


def build_app(settings: ServeSettings):  # noqa: ANN201 - (FastAPI, EngineClient)
    from pensieve.api.app import create_app

    served = load_served_model(settings)
    app = create_app(served.config, served.client, served.renderer, settings.batches)
    served.after_ready()
    # Everything built so far lives as long as the server: keep the collector from walking it.
    # Measured on CUDA: a full collection mid-generation stalled one decode step for 127 ms.
    gc.freeze()
    return app, served.client


@dataclass
class ServedModel:
    """One model ready to serve: its running engine client, API config and renderer.
    ``after_ready`` writes its packed-weights copy on first start (off the ready path)."""

    client: Any
    config: Any  # api.config.ApiConfig
    renderer: Any  # chat.prompt.PromptRenderer
    write_cache: Callable[[], None] | None = None

    def after_ready(self) -> None:
        if self.write_cache is not None:
            self.write_cache()
            self.write_cache = None


def load_served_model(settings: ServeSettings, api_config: Callable[..., Any] | None = None) -> ServedModel:
    """Load ``settings.model_path`` and start its engine; ``api_config`` builds its
    ``ApiConfig`` from the keyword arguments (default: ``ApiConfig`` itself)."""
    from pensieve.backends.torch_backend import torch_engine
    from pensieve.chat.prompt import PromptRenderer
    from pensieve.loaders.checkpoint import CheckpointError

    from pensieve.backends.cpu_memory import bound_heap, release_free_memory

    if settings.backend == "mlx":
        from pensieve.cli.serve_mlx import load_mlx_served_model

        return load_mlx_served_model(settings, api_config)
    on_cpu = torch.device(settings.engine.device).type == "cpu"
    if on_cpu:
        bound_heap()  # before loading: see backends/cpu_memory.py
    if settings.threads:
        torch.set_num_threads(settings.threads)
    with Phase("choosing the weight kernels (the first start compiles them)"):
        choice = choose_weights(settings)
    entry = _packed_entry(settings, choice) if on_cpu else None
    try:
        with Phase(f"loading {Path(settings.model_path).name}"):
            ckpt, engine_cfg, model, write_cache = _load_model(settings, choice, entry)
    except CheckpointError as exc:
        raise StartupError(str(exc)) from exc
    engine = torch_engine(model, ckpt.args, ckpt.tokenizer, engine_cfg)
    del model
    if torch.device(engine_cfg.device).type == "cuda":  # CPU start-up time matters more
        from pensieve.engine.warm_up import warm_up

        steps, seconds = warm_up(engine)
        log.info("warmed up the step shapes that compile kernels: %d steps in %.1f s", steps, seconds)
    if on_cpu:
        release_free_memory()
    client, api_cfg = start_serving(engine, settings, settings.served_name or ckpt.name,
                                    engine_cfg.context_length, engine_cfg.max_waiting, api_config)
    renderer = PromptRenderer(ckpt.tokenizer, ckpt.chat_template)
    return ServedModel(client, api_cfg, renderer, write_cache)


def start_serving(engine, settings: ServeSettings, name: str, context_length: int,  # noqa: ANN001
                  max_waiting: int, api_config: Callable[..., Any] | None) -> tuple[Any, Any]:
    """A loaded engine (any backend) → its running ``EngineClient`` and the API's config."""
    from pensieve.api.config import ApiConfig
    from pensieve.engine.client import EngineClient

    # the vocabulary's grammar tables, built off the first tool request: xgrammar (which
    # imports transformers, ~1.5 s) is imported on a thread a moment after the server is up
    prepare = threading.Timer(GRAMMAR_PREPARE_DELAY_S, _prepare_grammars, args=(engine,))
    prepare.daemon = True
    prepare.start()
    client = EngineClient(engine, name, max_waiting=max_waiting)
    client.start()
    api_cfg = (api_config or ApiConfig)(
        api_keys=settings.api_keys,
        model_id=name,
        model_aliases=settings.aliases,
        context_length=context_length,
        default_temperature=settings.default_temperature,
        default_top_p=settings.default_top_p,
        default_top_k=settings.default_top_k,
        dry=settings.dry,
        request_timeout_s=settings.request_timeout_s,
    )
    return client, api_cfg


GRAMMAR_PREPARE_DELAY_S = 1.0  # after build_app: uvicorn's start is not slowed by the import


def _prepare_grammars(engine) -> None:  # noqa: ANN001
    from pensieve.engine.grammar import grammar_available

    if grammar_available():
        engine.grammars.prepare()


def _packed_entry(settings: ServeSettings, choice: WeightChoice):  # noqa: ANN202
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


def _load_model(settings: ServeSettings, choice: WeightChoice, entry):  # noqa: ANN001, ANN202
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
                           tokenizer=None if hit is None else hit[2],
                           device=_convert_on(settings),
                           # a GPU server decoding on its host: every core (the CPU server's
                           # busy cores: one)
                           host_threads=1 if on_host else torch.get_num_threads())
    ckpt, engine_cfg = _fit_context(settings, ckpt)
    if hit is not None:
        planned, meta, _ = hit
        engine_cfg = replace(engine_cfg, int8_lm_head=bool(meta["int8_lm_head"]))
        try:
            model = build_model(ckpt, engine_cfg, planned)
        except Exception as exc:  # noqa: BLE001 - a cache: convert the GGUF instead
            log.warning("packed weights %s did not build (%s): converting the GGUF", entry.path, exc)
            packed_cache.discard(entry)
            return _load_model(settings, choice, entry)
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


def _convert_on(settings: ServeSettings) -> str | None:
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


def _int8_head(settings: ServeSettings, choice: WeightChoice, ckpt: Checkpoint) -> bool:
    """int8 output layer where chosen; under ``auto`` only for a model that came quantised
    (a float checkpoint keeps its float head unless ``--weights int4`` asks otherwise)."""
    if choice.int8_lm_head and settings.weights == "auto" and not ckpt.int4:
        log.info("float checkpoint: lm_head stays float under --weights auto")
        return False
    return choice.int8_lm_head


def _fit_context(settings: ServeSettings, ckpt: Checkpoint) -> tuple[Checkpoint, EngineConfig]:
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
