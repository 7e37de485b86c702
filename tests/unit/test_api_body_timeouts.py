"""Incomplete request bodies: a body that stalls gets 408 within the configured time (the
connection is not held for ever); a client that leaves mid-body is logged quietly (499), with
no ERROR and no traceback."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, text_script
from tests.helpers.server import serve_app_in_thread


@pytest.fixture(scope="module")
def server():
    app = create_app(ApiConfig(model_id="tiny-model", context_length=4096, body_timeout_s=0.5),
                     ScriptedEngine(text_script("ok")), PromptRenderer(CharTokenizer(), None))
    with serve_app_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port)


def _partial(addr, declared: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(addr, timeout=10)
    head = (f"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {declared}\r\n\r\n").encode()
    sock.sendall(head + sent)
    return sock


def test_a_stalled_body_gets_408(server):
    started = time.monotonic()
    with _partial(server, 1000, b'{"model": "tiny') as sock:
        reply = b""
        while b'"}' not in reply and (chunk := sock.recv(65536)):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408"), reply
    assert '"timeout_error"' in reply and time.monotonic() - started < 5


def test_a_client_leaving_mid_body_is_quiet(server, caplog):
    with caplog.at_level(logging.INFO):
        for _ in range(5):
            _partial(server, 1000, b'{"model": "tiny').close()
        time.sleep(0.3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert any("499" in r.getMessage() for r in caplog.records)
