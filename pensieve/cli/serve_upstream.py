"""``pensieve serve --backend upstream``: Pensieve's API in front of vLLM / SGLang replicas.

``--model`` names only the tokenizer and chat-template source (a GGUF or a Hugging Face
folder): its tokenizer is loaded, never its weights. The upstream serves the same model. The
flags may also come from a TOML file (``--upstream-config``)::

    urls = ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]   # or one router URL
    dialect = "vllm"                 # or "sglang"
    model = "SmolLM2-135M-Instruct"  # the upstream's served name (default: asked at start)
    routing_headers = ["X-Session-ID", "X-SMG-Routing-Key"]
    api_key = "…"                    # sent upstream as Authorization: Bearer
    health_interval_s = 5

Flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from pensieve.backends.upstream_config import UpstreamConfig
from pensieve.backends.upstream_request import DIALECTS
from pensieve.cli.settings import ServeSettings

log = logging.getLogger("pensieve")


def add_upstream_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("upstream backend (--backend upstream; docs/deployment.md)")
    g.add_argument("--upstream", action="append", default=[], metavar="URL",
                   help="a vLLM/SGLang replica or a router in front of them (repeatable)")
    g.add_argument("--upstream-config", type=Path, metavar="FILE",
                   help="TOML file with urls, dialect, model, routing_headers, api_key, ...")
    g.add_argument("--upstream-dialect", choices=DIALECTS, default=None,
                   help="vllm: POST /v1/completions with token ids (default); sglang: POST /generate")
    g.add_argument("--upstream-model", default=None,
                   help="the upstream's served model name (default: the first of its /v1/models)")
    g.add_argument("--upstream-routing-header", action="append", default=[], metavar="NAME",
                   help="header that carries the session key (default X-Session-ID; add "
                        "X-SMG-Routing-Key for SGLang's gateway)")
    g.add_argument("--upstream-api-key", default=None, help="bearer token for the upstream")


def upstream_config(ns: argparse.Namespace) -> UpstreamConfig:
    """``--upstream*`` flags over ``--upstream-config``'s values over the defaults."""
    values: dict[str, Any] = {}
    if ns.upstream_config is not None:
        values = _read_file(ns.upstream_config)
    if ns.upstream:
        values["urls"] = ns.upstream
    for flag, key in (("upstream_dialect", "dialect"), ("upstream_model", "model"),
                      ("upstream_api_key", "api_key")):
        if getattr(ns, flag) is not None:
            values[key] = getattr(ns, flag)
    if ns.upstream_routing_header:
        values["routing_headers"] = ns.upstream_routing_header
    if not values.get("urls"):
        raise ValueError("--backend upstream needs --upstream URL (repeatable) or --upstream-config")
    for key in ("urls", "routing_headers"):
        if key in values:
            values[key] = tuple(values[key])
    if values.get("dialect", "vllm") not in DIALECTS:
        raise ValueError(f"upstream dialect must be one of {', '.join(DIALECTS)}")
    for url in values["urls"]:
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"--upstream wants an http(s) URL, got {url!r}")
    return UpstreamConfig(**values)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--upstream-config {path}: {exc}") from exc
    known = {f.name for f in fields(UpstreamConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--upstream-config {path}: unknown keys {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    return data


def template_source(path: Path):  # noqa: ANN201 - (name, TextTokenizer, template, context)
    """The tokenizer and chat template of a GGUF or HF folder, without its weights."""
    from pensieve.loaders.registry import checkpoint_format, load_checkpoint
    from pensieve.loaders.safetensors import read_chat_template
    from pensieve.loaders.tokenizer import TextTokenizer

    path = path.expanduser()
    if checkpoint_format(path) == "gguf":
        ckpt = load_checkpoint(path, tensors=False)
        return ckpt.name, ckpt.tokenizer, ckpt.chat_template, ckpt.context_length
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    context = int(config.get("max_position_embeddings") or 0)
    return path.name, TextTokenizer.from_tokenizer_json(path), read_chat_template(path), context


def upstream_models(config: UpstreamConfig) -> tuple[str | None, int | None]:
    """The served model name and ``max_model_len`` the first answering replica reports."""
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    for url in config.urls:
        try:
            reply = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10.0)
            data = reply.json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            continue
        if data:
            return data[0].get("id"), data[0].get("max_model_len")
    return None, None


def build_upstream_app(settings: ServeSettings, ns: argparse.Namespace):  # noqa: ANN201
    """(FastAPI app, UpstreamClient) for ``serve_http``."""
    from dataclasses import replace

    try:
        from pensieve.backends.upstream_client import UpstreamClient
    except ImportError as exc:
        raise ValueError(f"--backend upstream needs httpx: pip install 'pensieve[upstream]' ({exc})") from exc
    from pensieve.api.app import create_app
    from pensieve.api.config import ApiConfig
    from pensieve.chat.prompt import PromptRenderer

    config = upstream_config(ns)
    name, tokenizer, template, context = template_source(settings.model_path)
    served, upstream_len = upstream_models(config)
    if config.model is None:
        if served is None and config.dialect == "vllm":
            raise ValueError("no --upstream answered /v1/models: start the replicas first or "
                             "pass --upstream-model")
        config = replace(config, model=served)
    limits = [n for n in (context, upstream_len, settings.context_length) if n]
    context_length = min(limits) if limits else 4096
    log.info("upstream %s (%s, model %s): context %d tokens, tokenizer and template from %s",
             ", ".join(config.urls), config.dialect, config.model, context_length,
             settings.model_path)
    client = UpstreamClient(config, tokenizer, context_length)
    client.start()
    log.info("upstream replicas: %s", client.replicas.describe())
    api_cfg = ApiConfig(
        api_keys=settings.api_keys,
        model_id=settings.served_name or name,
        model_aliases=settings.aliases,
        context_length=context_length,
        default_temperature=settings.default_temperature,
        dry=None,  # the loop guard needs logits: not applied upstream
        request_timeout_s=settings.request_timeout_s,
    )
    app = create_app(api_cfg, client, PromptRenderer(tokenizer, template), settings.batches)
    return app, client
