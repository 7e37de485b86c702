"""Start the real `pensieve serve` process on a free loopback port; stop it afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers.server import free_port

READY_TIMEOUT_S = 120.0


@contextmanager
def pensieve_server(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yields the base URL of a `pensieve serve` subprocess with ``args``."""
    port = free_port()
    log_path = Path(os.environ.get("PENSIEVE_TEST_LOG_DIR", "/tmp")) / f"pensieve-{port}.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "pensieve.cli.main", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *args]
    # batches of this server stay its own: never resume a user's ~/.pensieve/batches
    own_batches = {"PENSIEVE_BATCH_DIR": str(Path(tempfile.gettempdir()) / f"pensieve-test-batches-{port}-{time.time_ns()}")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **own_batches, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pensieve serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"pensieve serve not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
