"""The serving process: SIGTERM ends running streams with an ``error`` event and the process ends; an
engine that dies ends its streams at once and the process exits 1 for its supervisor;
``--api-key ""`` is refused before anything loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pensieve.cli.main import build_parser
from pensieve.cli.settings import settings_from_args
from tests.helpers.server import free_port

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "tiny-model", "max_tokens": 400, "stream": True, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}]}


def _start(mode: str = "") -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.tiny_serve", str(port), mode],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("tiny server did not start")


def _stream_events(url: str, on_first_delta=None) -> list[str]:
    events = []
    deadline = time.monotonic() + 20  # pings would keep a hung stream open for ever
    with httpx.stream("POST", f"{url}/v1/messages", json=BODY, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            assert time.monotonic() < deadline, f"stream still open after 20 s: {events[-5:]}"
            if line.startswith("event: "):
                events.append(line[7:])
                if events.count("content_block_delta") == 1 and on_first_delta is not None:
                    on_first_delta()
    return events


@pytest.mark.slow
def test_sigterm_ends_running_streams_with_an_error_event():
    proc, url = _start()
    try:
        started = time.monotonic()
        events = _stream_events(url, lambda: os.kill(proc.pid, signal.SIGTERM))
        assert events[-1] == "error" and "message_start" in events
        assert time.monotonic() - started < 10
        # uvicorn re-raises the signal once it has shut down
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


@pytest.mark.slow
def test_an_engine_that_dies_ends_streams_and_the_process_exits_one():
    proc, url = _start("die")
    try:
        events = _stream_events(url)
        assert events[-1] == "error"
        assert proc.wait(timeout=30) == 1
        assert "simulated device loss" in proc.stdout.read()
    finally:
        proc.kill()


def test_an_empty_api_key_is_refused_before_the_model_loads(monkeypatch):
    def no_model():
        raise AssertionError("the model was looked up")

    monkeypatch.setattr("pensieve.loaders.default_model.default_model_path", no_model)
    ns = build_parser().parse_args(["serve", "--api-key", ""])
    with pytest.raises(ValueError, match="--api-key must not be empty"):
        settings_from_args(ns, {})
