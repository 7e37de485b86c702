"""``pensieve start | stop | status | logs | ps``: a background server and a look at it.

``start`` runs ``pensieve serve`` in its own session, logging to ``$PENSIEVE_HOME/logs/
server.log``, records ``$PENSIEVE_HOME/server.pid`` (JSON: pid, url, log, command, start
time) and returns once ``/health`` answers — showing the server's latest log line (model
load, CPU kernel build, weights conversion) while it waits — or prints the log's tail and
exits non-zero. ``status`` and ``ps`` read the server's ``/v1/status`` and ``/metrics``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pensieve.store.paths import pensieve_home

DEFAULT_PORT = 7777
STOP_GRACE_S = 20.0


@dataclass(frozen=True)
class DaemonState:
    pid: int
    url: str
    log: str
    cmd: list[str]
    started: float
    api_key: str | None = None


def pid_path(env: Mapping[str, str] | None = None) -> Path:
    return pensieve_home(env) / "server.pid"


def log_path(env: Mapping[str, str] | None = None) -> Path:
    return pensieve_home(env) / "logs" / "server.log"


def read_state(env: Mapping[str, str] | None = None) -> DaemonState | None:
    """The recorded server, if its process is still alive (a stale pid file is removed)."""
    path = pid_path(env)
    try:
        state = DaemonState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours (tests) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def get_json(url: str, key: str | None = None, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers={"x-api-key": key or "pensieve-local"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback http
        body = resp.read()
    return json.loads(body) if body.strip().startswith((b"{", b"[")) else body.decode()


def healthy(url: str) -> bool:
    try:
        return get_json(f"{url}/health", timeout=1.0).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("start", help="start a background server (pensieve serve)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--model", help="GGUF, folder or store name (default: SmolLM2-135M)")
    p.add_argument("--store", help="the model store (default $PENSIEVE_HOME/models)")
    p.add_argument("--context-length", help="pensieve serve --context-length")
    p.add_argument("--api-key", help="require this key (pensieve serve --api-key)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="another argument for pensieve serve (repeatable)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the server to be ready (default 600)")
    p.set_defaults(func=start)
    s = sub.add_parser("stop", help="stop the background server")
    s.set_defaults(func=stop)
    st = sub.add_parser("status", help="the background server: models, memory, uptime, "
                                       "requests, tokens/s, cache hit rate")
    st.add_argument("--json", action="store_true", help="the raw /v1/status JSON")
    st.set_defaults(func=status)
    lg = sub.add_parser("logs", help="the background server's log")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    lg.set_defaults(func=logs)
    ps = sub.add_parser("ps", help="requests the background server is running")
    ps.set_defaults(func=ps_cmd)


def serve_command(ns: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "pensieve.cli.main", "serve", "--host", ns.host,
           "--port", str(ns.port)]
    for flag in ("model", "store", "context_length"):  # the key goes by environment, not argv
        value = getattr(ns, flag, None)
        if value is not None:
            cmd += ["--" + flag.replace("_", "-"), str(value)]
    return cmd + list(getattr(ns, "serve_arg", []))


def start(ns: argparse.Namespace) -> int:
    try:
        state = start_daemon(serve_command(ns), f"http://{ns.host}:{ns.port}", ns.timeout,
                             api_key=ns.api_key)
    except DaemonError as exc:
        print(f"pensieve: error: {exc}", file=sys.stderr)
        return 1
    print(f"pensieve server running at {state.url} (pid {state.pid}; log {state.log})")
    return 0


class DaemonError(Exception):
    """The background server could not be started or reached; the message says why."""


def start_daemon(cmd: list[str], url: str, timeout_s: float, *, api_key: str | None = None,
                 env: Mapping[str, str] | None = None) -> DaemonState:
    """Start ``cmd`` in the background unless a recorded server runs; wait for ``/health``."""
    running = read_state(env)
    if running is not None:
        if healthy(running.url):
            print(f"pensieve: already running at {running.url} (pid {running.pid}); "
                  "`pensieve stop` first to restart it with other settings", file=sys.stderr)
            return running
        raise DaemonError(f"a server (pid {running.pid}) is starting or stuck at {running.url}; "
                          "`pensieve logs` shows why, `pensieve stop` stops it")
    if healthy(url):
        raise DaemonError(f"something else already answers at {url}; pick another --port")
    log = log_path(env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== pensieve start {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(cmd)}\n".encode())
        out.flush()
        offset = out.tell()
        child_env = dict(os.environ if env is None else env)
        if api_key:  # not on the command line, where `ps` would show it
            child_env["PENSIEVE_API_KEY"] = api_key
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    state = DaemonState(proc.pid, url, str(log), cmd, time.time(), api_key)
    path = pid_path(env)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may hold the key
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(asdict(state)))
    try:
        _wait_ready(proc, state, offset, timeout_s, path)
    except KeyboardInterrupt:
        _terminate(proc.pid)
        path.unlink(missing_ok=True)
        raise DaemonError("interrupted: the server was stopped") from None
    return state


def _wait_ready(proc: subprocess.Popen, state: DaemonState, offset: int, timeout_s: float,
                path: Path) -> None:
    from pensieve.cli.progress_line import StatusLine

    deadline = time.monotonic() + timeout_s
    with StatusLine(f"starting pensieve at {state.url}") as line:
        while not healthy(state.url):
            line.show(_last_line(Path(state.log), offset))
            if proc.poll() is not None:
                path.unlink(missing_ok=True)
                raise DaemonError(f"the server exited with status {proc.returncode} before it "
                                  f"was ready; the end of {state.log}:\n"
                                  f"{_tail(Path(state.log), offset)}")
            if time.monotonic() > deadline:
                _terminate(proc.pid)
                path.unlink(missing_ok=True)
                raise DaemonError(f"the server was not ready in {timeout_s:g} s (stopped it); "
                                  f"the end of {state.log}:\n{_tail(Path(state.log), offset)}")
            time.sleep(0.25)


def _last_line(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(offset, f.seek(0, 2) - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][-120:] if lines else ""


def _tail(log: Path, offset: int, lines: int = 25) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join("  " + ln for ln in text.splitlines()[-lines:])


def _terminate(pid: int) -> bool:
    """SIGTERM, then SIGKILL after ``STOP_GRACE_S``; True once the process is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(0.2)
    return not _alive(pid)


def stop(ns: argparse.Namespace) -> int:
    state = read_state()
    if state is None:
        print("pensieve: no background server is running", file=sys.stderr)
        return 1
    gone = _terminate(state.pid)
    pid_path().unlink(missing_ok=True)
    print(f"stopped the server at {state.url} (pid {state.pid})" if gone
          else f"pid {state.pid} did not exit", file=sys.stderr if not gone else sys.stdout)
    return 0 if gone else 1


def _running_or_say() -> DaemonState | None:
    state = read_state()
    if state is None:
        print("pensieve: no background server is running (`pensieve start` starts one)",
              file=sys.stderr)
    return state


def status(ns: argparse.Namespace) -> int:
    state = _running_or_say()
    if state is None:
        return 1
    try:
        body = get_json(f"{state.url}/v1/status", state.api_key)
        metrics = get_json(f"{state.url}/metrics", state.api_key)
    except (OSError, ValueError) as exc:
        print(f"pensieve: the server (pid {state.pid}) does not answer at {state.url}: {exc}; "
              "`pensieve logs` shows why", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(body, indent=2))
        return 0
    for key, value in summary(body, metrics if isinstance(metrics, str) else "", state):
        print(f"{key:14} {value}")
    return 0


def summary(body: dict[str, Any], metrics: str, state: DaemonState) -> list[tuple[str, str]]:
    models = body.get("models") or []
    loaded = [m.get("id", "?") for m in models if m.get("loaded", True)]
    requests = sum(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                   if ln.startswith("pensieve_requests_total{") and _is_model_route(ln))
    recent = [b["tokens_per_s"] for b in body.get("throughput", [])][-12:]  # the last minute
    return [
        ("url", f"{state.url} (pid {state.pid})"),
        ("models", ", ".join(loaded) or "none loaded"),
        ("memory", _rss(state.pid)),
        ("uptime", _duration(float(body.get("uptime_s", 0)))),
        ("requests", f"{requests:.0f} answered, {len(body.get('running', []))} running"),
        ("tokens/s", f"{sum(recent) / len(recent):.1f} (last minute)" if recent else "-"),
        ("cache hits", f"{100 * float(body.get('cache_hit_rate', 0)):.1f}% of prompt tokens"),
    ]


MODEL_ROUTES = ("/v1/messages", "/v1/chat/completions", "/v1/completions")


def _is_model_route(line: str) -> bool:
    """A ``pensieve_requests_total`` sample of a generation route (not health/status/metrics)."""
    return any(f'route="{r}' in line for r in MODEL_ROUTES)


def _rss(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB resident"
    except OSError:
        pass
    return "?"


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def logs(ns: argparse.Namespace) -> int:
    path = log_path()
    if not path.exists():
        print(f"pensieve: no log at {path} (`pensieve start` writes it)", file=sys.stderr)
        return 1
    lines = path.read_text(errors="replace").splitlines()[-ns.lines:] if ns.lines > 0 else []
    for line in lines:
        print(line)
    if not ns.follow:
        return 0
    try:
        with open(path, errors="replace") as f:
            f.seek(0, 2)
            while True:
                line = f.readline()
                if line:
                    print(line, end="", flush=True)
                else:
                    time.sleep(0.25)
    except KeyboardInterrupt:
        return 0


def ps_cmd(ns: argparse.Namespace) -> int:
    state = _running_or_say()
    if state is None:
        return 1
    try:
        body = get_json(f"{state.url}/v1/status", state.api_key)
    except (OSError, ValueError) as exc:
        print(f"pensieve: the server does not answer at {state.url}: {exc}", file=sys.stderr)
        return 1
    running = body.get("running", [])
    if not running:
        print("no requests running")
        return 0
    print(f"{'ID':28} {'MODEL':24} {'ROUTE':18} {'ELAPSED':>8} {'PROMPT':>7} {'OUTPUT':>7} "
          f"{'PROGRESS':>8}")
    for r in running:
        print(f"{str(r.get('id'))[:28]:28} {str(r.get('model'))[:24]:24} "
              f"{str(r.get('route'))[:18]:18} {r.get('elapsed_s', 0):>7.1f}s "
              f"{r.get('prompt_tokens', 0):>7} {r.get('output_tokens', 0):>7} "
              f"{100 * r.get('progress', 0):>7.1f}%")
    return 0
