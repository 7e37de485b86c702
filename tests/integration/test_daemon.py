"""``pensieve start / status / ps / logs / stop`` against a real background server (the
default SmolLM2 model), each command run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import pytest

from pensieve.cli.daemon import read_state
from tests.helpers.server import free_port

pytestmark = pytest.mark.slow


def cli(*args: str, home: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pensieve.cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, "PENSIEVE_HOME": str(home)},
                          timeout=timeout)


def test_start_status_ps_logs_stop(tmp_path: Path) -> None:
    port = free_port()
    started = cli("start", "--port", str(port), "--api-key", "sekrit", "--serve-arg=--device=cpu",
                  home=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        assert f"running at http://127.0.0.1:{port}" in started.stdout
        state = read_state({"PENSIEVE_HOME": str(tmp_path)})
        assert state is not None and state.url == f"http://127.0.0.1:{port}"
        assert (tmp_path / "logs" / "server.log").stat().st_size > 0
        assert (tmp_path / "server.pid").stat().st_mode & 0o077 == 0  # it holds the key
        assert b"sekrit" not in Path(f"/proc/{state.pid}/cmdline").read_bytes()
        again = cli("start", "--port", str(port), home=tmp_path)
        assert again.returncode == 0 and "already running" in again.stderr
        client = anthropic.Anthropic(base_url=state.url, api_key="sekrit", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=state.url, api_key="wrong", max_retries=0).models.list()
        reply = client.messages.create(model="claude-sonnet-5", max_tokens=16,
                                       messages=[{"role": "user", "content": "Hi!"}])
        assert reply.content[0].text
        status = cli("status", home=tmp_path)
        assert status.returncode == 0, status.stderr
        rows = dict(line.split(None, 1) for line in status.stdout.splitlines())
        assert rows["models"] == "SmolLM2-135M-Instruct"
        assert rows["requests"].startswith("1 answered")
        assert rows["memory"].endswith("MiB resident") and int(rows["memory"].split()[0]) > 50
        assert "cache" in status.stdout and "tokens/s" in rows
        raw = json.loads(cli("status", "--json", home=tmp_path).stdout)
        assert raw["tokens"]["SmolLM2-135M-Instruct"]["output_tokens"] == reply.usage.output_tokens
        _ps_sees_a_running_request(client, tmp_path)
        logs = cli("logs", "-n", "400", home=tmp_path)
        assert "POST /v1/messages" in logs.stdout and "pensieve start" in logs.stdout
    finally:
        stopped = cli("stop", home=tmp_path)
    assert stopped.returncode == 0 and "stopped the server" in stopped.stdout
    assert not (tmp_path / "server.pid").exists()
    after = cli("status", home=tmp_path)
    assert after.returncode == 1 and "no background server" in after.stderr


def _ps_sees_a_running_request(client: anthropic.Anthropic, home: Path) -> None:
    """Four long answers streaming at once: ``ps`` lists those still running."""
    first = threading.Event()
    done = []

    def long_answer() -> None:
        with client.messages.stream(
                model="claude-sonnet-5", max_tokens=1500, messages=[{"role": "user", "content":
                "Write a very long story about a lighthouse keeper, chapter by chapter."}]) as s:
            for _ in s.text_stream:
                first.set()
        done.append(True)

    threads = [threading.Thread(target=long_answer) for _ in range(4)]
    for t in threads:
        t.start()
    assert first.wait(120)
    ps = cli("ps", home=home, timeout=60)
    for t in threads:
        t.join(600)
    assert ps.returncode == 0, ps.stderr
    lines = ps.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "MODEL", "ROUTE"], ps.stdout
    rows = [ln.split() for ln in lines[1:]]
    assert rows and all(r[0].startswith("req_") and r[1:3] == ["SmolLM2-135M-Instruct", "messages"]
                        for r in rows), ps.stdout
    assert all(int(r[5]) > 0 and float(r[6].rstrip("%")) > 0 for r in rows), ps.stdout
    assert len(done) == 4


def test_start_says_why_a_server_did_not_come_up(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    began = time.monotonic()
    started = cli("start", "--port", str(free_port()), "--model", str(bad), home=tmp_path)
    assert started.returncode == 1
    assert "exited with status" in started.stderr and "broken.gguf" in started.stderr
    assert "Traceback" not in started.stderr.split("the end of")[0]
    assert time.monotonic() - began < 600
    assert not (tmp_path / "server.pid").exists()
    assert cli("stop", home=tmp_path).returncode == 1
