"""Run an ASGI app on a real uvicorn server in a background thread, for SDK-driven tests.

    with serve_app_in_thread(app) as base_url:
        client = anthropic.Anthropic(base_url=base_url, api_key="k")
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

STARTUP_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_app_in_thread(app: Any, *, host: str = "127.0.0.1", log_level: str = "warning",
                        **config_kwargs: Any) -> Iterator[str]:
    """Serve ``app`` on a free port of ``host``; yields ``http://host:port``; stops at exit.
    ``config_kwargs`` go to ``uvicorn.Config`` (e.g. ``http=`` a protocol class)."""
    port = free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            access_log=False, **config_kwargs)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"uvicorn on {host}:{port} exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"uvicorn on {host}:{port} did not start in {STARTUP_TIMEOUT_S} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=STARTUP_TIMEOUT_S)
