"""The real Claude Code CLI for end-to-end tests: installed from npm into a cache dir of the
repository once, run headless (``-p … --output-format stream-json``) on loopback with a
fresh HOME and config dir, its stream-json events parsed."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "claude-code"
PACKAGE = "@anthropic-ai/claude-code"
# The version these tests were written against; bump it deliberately (env overrides).
VERSION = os.environ.get("PENSIEVE_CLAUDE_CODE_VERSION", "2.1.331")
NPM_TIMEOUT_S = 600
# Keep Claude Code on loopback and quiet (DESIGN.md §3).
QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
}


def installed_version(cache: Path) -> str | None:
    manifest = cache / "node_modules" / PACKAGE / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def install_claude_code(cache: Path = CACHE_DIR, version: str = VERSION) -> Path:
    """The ``claude`` executable of ``PACKAGE@version`` in ``cache`` (npm install if absent).

    Skips the calling test when npm is not installed; fails it when npm fails (CI has npm
    and the npm registry, so a failure there is a real one). A lock file keeps concurrent
    test sessions from installing over each other.
    """
    binary = cache / "node_modules" / ".bin" / "claude"
    if installed_version(cache) == version and binary.exists():
        return binary
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed: the Claude Code e2e tests need it to install {PACKAGE}")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(cache) != version or not binary.exists():
            _npm_install(npm, cache, version)
    if not binary.exists():
        pytest.fail(f"npm installed {PACKAGE}@{version} but {binary} is missing")
    return binary


def _npm_install(npm: str, cache: Path, version: str) -> None:
    cmd = [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--no-save",
           "--loglevel=error", f"{PACKAGE}@{version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(cmd)}` took more than {NPM_TIMEOUT_S} s")
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


@dataclass
class ClaudeRun:
    """One finished ``claude -p`` run: exit status, stream-json events, stderr."""

    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        """The final ``{"type": "result", …}`` event (its ``result`` is the answer)."""
        results = [e for e in self.events if e.get("type") == "result"]
        assert results, f"no result event; exit {self.returncode}\n{self.describe()}"
        return results[-1]

    def blocks(self, role: str, block_type: str) -> list[dict[str, Any]]:
        """Content blocks of ``assistant``/``user`` events, of one type, in order."""
        found = []
        for event in self.events:
            content = (event.get("message") or {}).get("content")
            if event.get("type") == role and isinstance(content, list):
                found += [b for b in content if b.get("type") == block_type]
        return found

    def describe(self) -> str:
        lines = [json.dumps(e)[:400] for e in self.events[-12:]]
        return "\n".join(lines) + f"\nstderr: {self.stderr[-2000:]}"


def claude_env(home: Path, base_url: str, **extra: str) -> dict[str, str]:
    """A minimal environment: a fresh HOME and config dir, this server, nothing inherited
    that could point Claude Code elsewhere (the caller's ANTHROPIC_* never leak in)."""
    (home / "config").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "CLAUDE_CONFIG_DIR": str(home / "config"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "pensieve-e2e",
        **QUIET_ENV,
        **extra,
    }


def run_headless(cmd: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> ClaudeRun:
    """Run a command that ends in ``claude -p … --output-format stream-json --verbose``."""
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"{cmd[:3]} ran over {timeout_s} s; last output:\n{out[-3000:]}")
    events = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return ClaudeRun(proc.returncode, events, proc.stderr)


def headless_args(prompt: str, *extra: str) -> list[str]:
    return ["-p", prompt, "--output-format", "stream-json", "--verbose", *extra]
