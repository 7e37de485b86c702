"""``pensieve run [MODEL]``: a chat in the terminal against the local server.

Uses the server answering at ``--url`` (default: the background server ``pensieve start``
recorded, else $PENSIEVE_URL or http://127.0.0.1:7777); with none there it starts one in the
background serving MODEL, and leaves it running for the next ``run`` (``pensieve stop``
stops it). Answers stream as they are generated; the conversation is kept turn to turn.
``/bye`` (or Ctrl-D) ends the chat, ``/clear`` forgets the conversation, Ctrl-C stops an
answer mid-way.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

from pensieve.cli.claude import served_model, server_is_up
from pensieve.cli.daemon import DaemonError, read_state, start_daemon

DEFAULT_URL = "http://127.0.0.1:7777"
HELP = ('/bye ends the chat, /clear forgets it, """ starts and ends several lines, '
        "Ctrl-C stops an answer")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="chat with a model in the terminal (starts a server if none)")
    p.add_argument("model", nargs="?", help="a store name, GGUF or folder (default: whatever "
                   "the running server serves, else SmolLM2-135M)")
    p.add_argument("--url", help="the server (default: the one `pensieve start` recorded, "
                   f"else $PENSIEVE_URL or {DEFAULT_URL})")
    p.add_argument("--api-key", help="the server's key (default $PENSIEVE_API_KEY)")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=2048, help="per answer (default 2048)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for a server this command starts (default 600)")
    p.set_defaults(func=run)


def _url(ns: argparse.Namespace) -> str:
    if ns.url:
        return ns.url.rstrip("/")
    state = read_state()
    if state is not None:
        return state.url
    return os.environ.get("PENSIEVE_URL", DEFAULT_URL).rstrip("/")


def ensure_server(ns: argparse.Namespace, key: str | None) -> tuple[str, str]:
    """(url, model id to ask for): the running server's, or one started for ``ns.model``."""
    url = _url(ns)
    if server_is_up(url):
        served = served_model(url, key)
        if ns.model and ns.model != served["id"] and not _serves(url, key, ns.model):
            raise DaemonError(f"the server at {url} serves {served['id']}, not {ns.model}: "
                              f"`pensieve stop` first, or `pensieve run` without a model")
        return url, ns.model if ns.model and ns.model != served["id"] and \
            _serves(url, key, ns.model) else served["id"]
    parts = urlsplit(url)
    cmd = [sys.executable, "-m", "pensieve.cli.main", "serve", "--host",
           parts.hostname or "127.0.0.1", "--port", str(parts.port or 7777)]
    cmd += ["--model", ns.model] if ns.model else []
    start_daemon(cmd, url, ns.timeout, api_key=key)
    print(f"pensieve: started a background server at {url} (`pensieve stop` stops it)",
          file=sys.stderr)
    return url, served_model(url, key)["id"]


def _serves(url: str, key: str | None, model: str) -> bool:
    """Whether the server answers ``GET /v1/models/{model}`` (a name, alias or route)."""
    from urllib.parse import quote

    from pensieve.cli.daemon import get_json

    try:
        return bool(get_json(f"{url}/v1/models/{quote(model, safe='')}", key).get("id"))
    except (OSError, ValueError, AttributeError):
        return False


def stream_reply(url: str, key: str | None, body: dict) -> Iterator[str]:
    """The text deltas of one streamed ``/v1/messages`` answer; DaemonError on an error."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=3600)
    try:
        conn.request("POST", "/v1/messages", json.dumps(body).encode(), {
            "content-type": "application/json", "x-api-key": key or "pensieve-local",
            "anthropic-version": "2023-06-01"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise DaemonError(_error_text(resp.read(), resp.status))
        event = ""
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "error":
                    raise DaemonError(data.get("error", {}).get("message", "error"))
                delta = data.get("delta", {}) if event == "content_block_delta" else {}
                if delta.get("type") == "text_delta":
                    yield delta["text"]
                elif event == "message_stop":
                    return
    finally:
        conn.close()


def _error_text(body: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200]!r}"


def chat(url: str, key: str | None, model: str, ns: argparse.Namespace) -> int:
    messages: list[dict] = []
    print(f"chatting with {model} at {url} — {HELP}", flush=True)
    _line_editing()
    while True:
        try:
            text = _read_turn()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if text.strip() in ("/bye", "/exit", "/quit"):
            return 0
        if text.strip() == "/clear":
            messages.clear()
            print("(conversation cleared)")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        body = {"model": model, "max_tokens": ns.max_tokens, "stream": True, "messages": messages}
        if ns.system:
            body["system"] = ns.system
        answer = []
        try:
            for piece in stream_reply(url, key, body):
                answer.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except (DaemonError, OSError, ValueError) as exc:
            print(f"\npensieve: error: {exc}", file=sys.stderr)
            messages.pop()
            continue
        print("\n", flush=True)
        messages.append({"role": "assistant", "content": "".join(answer) or "(no answer)"})


def _line_editing() -> None:
    """Arrow keys and history in ``input()`` where the platform has readline."""
    try:
        import readline  # noqa: F401 - importing it is what turns line editing on
    except ImportError:
        pass


def _read_turn() -> str:
    """One user turn: a line, or several between a pair of triple quotes."""
    text = input(">>> ")
    if not text.lstrip().startswith('"""'):
        return text
    lines = [text.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""') or len(lines) == 1 and lines[0].strip() == "":
        lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip()


def run(ns: argparse.Namespace) -> int:
    keys = [k for k in os.environ.get("PENSIEVE_API_KEY", "").split(",") if k]
    key = ns.api_key or (keys[0] if keys else None)
    try:
        url, model = ensure_server(ns, key)
    except Exception as exc:  # noqa: BLE001 - LaunchError / DaemonError: one line, no traceback
        print(f"pensieve: error: {exc}", file=sys.stderr)
        return 1
    return chat(url, key, model, ns)
