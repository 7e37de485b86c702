"""`pensieve serve`: its flags, the bind check, and the command: the app built (one model,
a ``--config`` pool or upstream servers), then served (``http_server.py``)."""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import time

from pensieve.cli.errors import StartupError
from pensieve.cli.http_server import serve_http
from pensieve.cli.serve_upstream import add_upstream_args
from pensieve.cli.settings import BACKENDS, WEIGHTS, ServeSettings, settings_from_args
from pensieve.engine.types import DEFAULT_DRY

log = logging.getLogger("pensieve")


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
                   help="requests decoding together in one step (default 32 on CUDA, 8 on the CPU)")
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
    p.add_argument("--kv-cache-gb", type=float, default=None, metavar="GB",
                   help="the KV cache's size in GiB (default: 1 on the CPU; on CUDA what "
                        "--gpu-memory-fraction leaves, which a set size caps)")
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
    # main() imported this command's modules with the collector off: what they made lives as
    # long as the server (a few thousand objects of import-time garbage kept with it)
    gc.freeze()
    gc.enable()
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


def build_app(settings: ServeSettings):  # noqa: ANN201 - (FastAPI, EngineClient)
    from pensieve.api.app import create_app
    from pensieve.cli.served_model import load_served_model

    served = load_served_model(settings)
    app = create_app(served.config, served.client, served.renderer, settings.batches)
    served.after_ready()
    # Everything built so far lives as long as the server: keep the collector from walking it.
    # Measured on CUDA: a full collection mid-generation stalled one decode step for 127 ms.
    gc.freeze()
    return app, served.client
