"""`pensieve claude [options] [claude args…]`: run the user's Claude Code against Pensieve.

Uses the server answering on ``--url`` (default http://127.0.0.1:7777), or starts
``pensieve serve`` there in the background and stops it when Claude Code exits (unless
``--keep-server``). Claude Code runs with the server's URL, a key, every model slot mapped to
the served model, nonessential traffic off, and its own config dir (default
~/.pensieve/claude-config) — the user's ~/.claude is never read or written.

Launcher options come first; the first argument that is not one of them (or everything after
``--``) goes to ``claude`` unchanged, so ``pensieve claude -p "hi" --model x`` hands
``--model x`` to Claude Code while ``pensieve claude --model m.gguf -p "hi"`` serves m.gguf.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:7777"
PLACEHOLDER_KEY = "pensieve-local"  # any key works when the server asks for none
INSTALL_HINT = "npm install -g @anthropic-ai/claude-code"
EXIT_NOT_INSTALLED = 127
EXIT_NO_SERVER = 1
MODEL_SLOTS = (
    "ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_DEFAULT_FABLE_MODEL", "ANTHROPIC_SMALL_FAST_MODEL",
    "CLAUDE_CODE_SUBAGENT_MODEL",
)
QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
}
# Variables that would send Claude Code somewhere else or authenticate it as someone else.
DROPPED_ENV = (
    "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX",
    "CLAUDE_CODE_USE_FOUNDRY", "ANTHROPIC_CUSTOM_HEADERS",
)
CLAUDE_CODE_DEFAULT_PROMPT_TOKENS = 20000  # its default request, measured (docs/context.md)
LONG_REQUEST_TIMEOUT_MS = "3600000"  # CPU prefill of a 20k-token prompt takes minutes


class LaunchError(Exception):
    """The launcher cannot go on; ``exit_code`` is what ``pensieve claude`` returns."""

    def __init__(self, message: str, exit_code: int = EXIT_NO_SERVER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# name → (takes a value, help); the table both the parser and the argv split read.
OPTIONS: dict[str, tuple[bool, str]] = {
    "--url": (True, f"the Pensieve server (default $PENSIEVE_URL or {DEFAULT_URL})"),
    "--api-key": (True, "the server's key (default $PENSIEVE_API_KEY, else a placeholder)"),
    "--claude-bin": (True, "the claude executable (default $PENSIEVE_CLAUDE_BIN, else on PATH)"),
    "--config-dir": (True, "Claude Code's config dir (default ~/.pensieve/claude-config)"),
    "--keep-server": (False, "leave a server this command started running afterwards"),
    "--startup-timeout": (True, "seconds to wait for a started server (default 300)"),
    "--model": (True, "serve this model when a server is started (pensieve serve --model)"),
    "--context-length": (True, "pensieve serve --context-length, when a server is started"),
    "--rope-scale": (True, "pensieve serve --rope-scale, when a server is started"),
    "--serve-arg": (True, "another argument for a started pensieve serve (repeatable)"),
    "--help": (False, "show this help (claude's own: pensieve claude -- --help)"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Listed under `pensieve --help`; main() hands `claude`'s argv to run() untouched."""
    sub.add_parser("claude", help="run Claude Code against the local server "
                                  "(pensieve claude --help)", add_help=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pensieve claude", add_help=False, allow_abbrev=False,
        usage="pensieve claude [launcher options] [--] [claude arguments…]",
        description="Run Claude Code against the local Pensieve server (started if needed).",
    )
    for name, (takes_value, text) in OPTIONS.items():
        if name == "--help":
            p.add_argument(name, "-h", action="help", help=text)
        elif name == "--serve-arg":
            p.add_argument(name, action="append", default=[], metavar="ARG", help=text)
        elif takes_value:
            p.add_argument(name, help=text)
        else:
            p.add_argument(name, action="store_true", help=text)
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(launcher args, claude args): launcher options are a prefix of ``argv``."""
    own: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return own, list(argv[i + 1:])
        name = "--help" if arg == "-h" else arg.split("=", 1)[0]
        if name not in OPTIONS:
            break
        if OPTIONS[name][0] and "=" not in arg:
            if i + 1 == len(argv):
                raise LaunchError(f"{name} wants a value", 2)
            arg = f"{name}={argv[i + 1]}"  # `=`: a value may itself start with "--"
            i += 1
        own.append(arg)
        i += 1
    return own, list(argv[i:])


@dataclass(frozen=True)
class LaunchSettings:
    url: str
    api_key: str | None  # None → the server wants none; a placeholder is sent
    claude_bin: str | None
    config_dir: Path
    keep_server: bool
    startup_timeout_s: float
    serve_args: tuple[str, ...]
    state_dir: Path  # logs of started servers


def settings_from(ns: argparse.Namespace, env: Mapping[str, str]) -> LaunchSettings:
    user_home = Path(env.get("HOME") or Path.home())
    home = Path(env.get("PENSIEVE_HOME") or user_home / ".pensieve").expanduser()
    config_dir = Path(ns.config_dir or home / "claude-config").expanduser().resolve()
    if config_dir == (user_home / ".claude").resolve():
        raise LaunchError(f"refusing to use {config_dir}: that is your own Claude Code config", 2)
    serve_args: list[str] = []
    for flag in ("model", "context_length", "rope_scale"):
        value = getattr(ns, flag)
        if value is not None:
            serve_args += ["--" + flag.replace("_", "-"), value]
    keys = [k for k in env.get("PENSIEVE_API_KEY", "").split(",") if k]
    try:
        timeout = float(ns.startup_timeout or 300)
    except ValueError:
        raise LaunchError(f"--startup-timeout wants seconds, got {ns.startup_timeout!r}", 2) from None
    return LaunchSettings(
        url=(ns.url or env.get("PENSIEVE_URL") or DEFAULT_URL).rstrip("/"),
        api_key=ns.api_key or (keys[0] if keys else None),
        claude_bin=ns.claude_bin or env.get("PENSIEVE_CLAUDE_BIN") or None,
        config_dir=config_dir,
        keep_server=ns.keep_server,
        startup_timeout_s=timeout,
        serve_args=tuple(serve_args + list(ns.serve_arg)),
        state_dir=home / "logs",
    )


def find_claude(explicit: str | None, path: str | None) -> str:
    """The claude executable (``explicit`` or on ``path``), or LaunchError(127) saying how
    to install it."""
    found = shutil.which(explicit or "claude", path=path)
    if found:
        return found
    where = f"{explicit!r} is not an executable" if explicit else "`claude` is not on PATH"
    raise LaunchError(
        f"Claude Code is not installed ({where}). Install it with:\n"
        f"    {INSTALL_HINT}\n"
        "or point --claude-bin / PENSIEVE_CLAUDE_BIN at the executable.",
        EXIT_NOT_INSTALLED,
    )


def _get(url: str, key: str | None, timeout: float) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"x-api-key": key or PLACEHOLDER_KEY})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def server_is_up(url: str, timeout: float = 1.0) -> bool:
    try:
        return _get(f"{url}/health", None, timeout)[0] == 200
    except (OSError, ValueError):
        return False


def served_model(url: str, key: str | None) -> dict:
    """The first model of ``GET /v1/models`` (id, max_input_tokens …)."""
    return served_models(url, key)[0]


# Claude Code's tiers: the env slots each ``claude-<tier>…`` route fills (with several models)
TIER_SLOTS = {
    "haiku": ("ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL"),
    "sonnet": ("ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_MODEL", "CLAUDE_CODE_SUBAGENT_MODEL"),
    "opus": ("ANTHROPIC_DEFAULT_OPUS_MODEL",),
}


def tier_models(models: Sequence[Mapping[str, object]]) -> dict[str, str]:
    """Env slot → model id from the server's routes: the first listed id starting with
    ``claude-haiku`` fills the haiku slots, ``claude-sonnet`` the sonnet ones (the main and
    subagent model too), ``claude-opus`` the opus one. Slots without a route are left out."""
    out: dict[str, str] = {}
    for tier, slots in TIER_SLOTS.items():
        found = next((str(m["id"]) for m in models if str(m.get("id", "")).startswith(f"claude-{tier}")), None)
        if found is not None:
            out.update(dict.fromkeys(slots, found))
    return out


def served_models(url: str, key: str | None) -> list[dict]:
    """``GET /v1/models?limit=1000``: every model id the server lists (routes first)."""
    try:
        status, body = _get(f"{url}/v1/models?limit=1000", key, 10.0)
    except OSError as exc:
        raise LaunchError(f"{url}/v1/models did not answer: {exc}") from exc
    if status in (401, 403):
        raise LaunchError(f"the server at {url} refused the key: pass --api-key or set "
                          "PENSIEVE_API_KEY")
    try:
        models = json.loads(body)["data"]
        first = dict(models[0])  # IndexError when the list is empty
        return [first, *(dict(m) for m in models[1:])]
    except (ValueError, KeyError, IndexError, TypeError):
        raise LaunchError(f"{url}/v1/models answered {status} without a model list") from None


class BackgroundServer:
    """A `pensieve serve` child process on the launcher's URL, logging to a file."""

    def __init__(self, settings: LaunchSettings) -> None:
        parts = urlsplit(settings.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 7777
        if parts.scheme != "http" or not _is_loopback(host):
            raise LaunchError(f"no server answers at {settings.url}, and only a loopback "
                              "http:// URL can be started here")
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = settings.state_dir / f"serve-{port}.log"
        self.cmd = [sys.executable, "-m", "pensieve.cli.main", "serve", "--host", host,
                    "--port", str(port), *settings.serve_args]
        if settings.api_key and "--api-key" not in settings.serve_args:
            self.cmd += ["--api-key", settings.api_key]
        self.url = settings.url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> None:
        _note(f"starting pensieve serve on {self.url} (log: {self.log_path})")
        with open(self.log_path, "ab") as log:
            # its own session: a Ctrl-C meant for Claude Code must not stop the server
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not server_is_up(self.url):
            if self.proc.poll() is not None:
                raise LaunchError(f"pensieve serve exited with {self.proc.returncode}:\n"
                                  f"{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise LaunchError(f"pensieve serve was not ready in {timeout_s:g} s:\n"
                                  f"{_tail(self.log_path)}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def claude_env(base: Mapping[str, str], url: str, key: str, model: str,
               config_dir: Path, tiers: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment Claude Code runs in: this server, this model (or, with several, each
    tier's: ``tiers`` maps slots to ids), nothing else."""
    env = {k: v for k, v in base.items() if k not in DROPPED_ENV}
    env.update(QUIET_ENV)
    env["ANTHROPIC_BASE_URL"] = url
    env["ANTHROPIC_API_KEY"] = key
    env.update(dict.fromkeys(MODEL_SLOTS, model))
    env.update(tiers or {})
    env["CLAUDE_CONFIG_DIR"] = str(config_dir)
    env.setdefault("API_TIMEOUT_MS", LONG_REQUEST_TIMEOUT_MS)
    return env


def prepare_config_dir(config_dir: Path, key: str) -> None:
    """Create the isolated config dir; pre-accept the local key and skip the first-run
    onboarding there (Claude Code would otherwise ask whether to use the API key it found)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / ".claude.json"
    try:
        state = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        state = {}
    if not isinstance(state, dict):
        state = {}
    responses = state.setdefault("customApiKeyResponses", {"approved": [], "rejected": []})
    approved = responses.setdefault("approved", [])
    suffix = key.strip()[-20:]  # Claude Code remembers a key by its last 20 characters
    if suffix in approved and state.get("hasCompletedOnboarding"):
        return
    if suffix not in approved:
        approved.append(suffix)
    state["hasCompletedOnboarding"] = True
    tmp = path.with_suffix(".json.pensieve-tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


def run_claude(claude_bin: str, args: Sequence[str], env: Mapping[str, str]) -> int:
    """Run Claude Code in the foreground; its exit status (128+N when killed by signal N)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child handles Ctrl-C
    try:
        code = subprocess.call([claude_bin, *args], env=dict(env))
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code


def launch(settings: LaunchSettings, claude_args: Sequence[str], env: Mapping[str, str]) -> int:
    claude_bin = find_claude(settings.claude_bin, env.get("PATH"))
    server: BackgroundServer | None = None
    try:
        if server_is_up(settings.url):
            if settings.serve_args:
                _note(f"a server already answers at {settings.url}: "
                      f"ignoring {' '.join(settings.serve_args)}")
        else:
            server = BackgroundServer(settings)
            server.start(settings.startup_timeout_s)
        models = served_models(settings.url, settings.api_key)
        model, tiers = models[0], tier_models(models)
        _note(f"Claude Code → {settings.url} ({model.get('id')}, "
              f"context {model.get('max_input_tokens', '?')} tokens)")
        _warn_small_context(model.get("max_input_tokens"))
        key = settings.api_key or PLACEHOLDER_KEY
        prepare_config_dir(settings.config_dir, key)
        main = tiers.get("ANTHROPIC_MODEL", str(model["id"]))
        if len({*tiers.values()}) > 1:
            _note("Claude Code tiers: " + ", ".join(f"{t} → {tiers[slots[0]]}" for t, slots in TIER_SLOTS.items()
                                                      if slots[0] in tiers))
        child_env = claude_env(env, settings.url, key, main, settings.config_dir, tiers)
        return run_claude(claude_bin, claude_args, child_env)
    finally:
        if server is not None:
            if settings.keep_server and server.proc is not None:
                _note(f"server left running on {settings.url} (pid {server.proc.pid})")
            else:
                server.stop()


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        own, claude_args = split_argv(argv)
        ns = build_parser().parse_args(own)
        return launch(settings_from(ns, env), claude_args, env)
    except LaunchError as exc:
        print(f"pensieve claude: {exc}", file=sys.stderr)
        return exc.exit_code


def _warn_small_context(context: object) -> None:
    if isinstance(context, int) and context < CLAUDE_CODE_DEFAULT_PROMPT_TOKENS:
        _note(f"Claude Code's default tool set alone takes ~12-20k tokens, more than this "
              f"server's {context}: serve with --context-length 32768 (RoPE-scaled, see "
              "docs/context.md) or give Claude Code fewer tools (--tools Bash,Read)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _note(message: str) -> None:
    print(f"pensieve: {message}", file=sys.stderr, flush=True)
