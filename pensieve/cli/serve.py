"""`pensieve serve`: load a model, build the engine and the API, run uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import time

import torch

from pensieve.cli.settings import ServeSettings, settings_from_args

log = logging.getLogger("pensieve")


class StartupError(Exception):
    """A configuration that must not start (bad flags, unsafe bind, unloadable model)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the Anthropic Messages API")
    p.add_argument("--model", help="GGUF file or HF safetensors folder (default: SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--api-key", action="append", default=[], help="require this key (repeatable); "
                   "also PENSIEVE_API_KEY")
    p.add_argument("--served-name", help="model id reported by /v1/models")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=MODEL",
                   help="extra model name that maps to the served model (repeatable)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--context-length", type=int, default=None,
                   help="max tokens per request (default: the model's own)")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
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
    app, client = build_app(settings)
    log.info("model %s ready in %.2f s", settings.served_name or "", time.perf_counter() - started)
    import uvicorn

    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=ns.log_level.lower(),
                    timeout_graceful_shutdown=5)
    finally:
        client.shutdown()
    return 0


def build_app(settings: ServeSettings):  # noqa: ANN201 - (FastAPI, EngineClient)
    from pensieve.api.app import create_app
    from pensieve.api.config import ApiConfig
    from pensieve.backends.torch_backend import build_engine
    from pensieve.chat.prompt import PromptRenderer
    from pensieve.engine.client import EngineClient
    from pensieve.loaders.checkpoint import CheckpointError
    from pensieve.loaders.registry import load_checkpoint

    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        ckpt = load_checkpoint(settings.model_path, dtype=settings.engine.dtype)
    except CheckpointError as exc:
        raise StartupError(str(exc)) from exc
    engine_cfg = settings.engine_for(ckpt.context_length)
    engine = build_engine(ckpt, engine_cfg)
    name = settings.served_name or ckpt.name
    client = EngineClient(engine, name, max_waiting=engine_cfg.max_waiting)
    client.start()
    api_cfg = ApiConfig(
        api_keys=settings.api_keys,
        model_id=name,
        model_aliases=settings.aliases,
        context_length=engine_cfg.context_length,
    )
    renderer = PromptRenderer(ckpt.tokenizer, ckpt.chat_template)
    return create_app(api_cfg, client, renderer), client
