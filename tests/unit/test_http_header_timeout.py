"""Request heads have a deadline (pensieve/cli/http_protocol.py): a connection that stops
mid-head is closed; a kept-alive connection gets a fresh deadline per request; a slow body is
not this timer's business."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

from pensieve.cli.http_protocol import HeaderTimeoutProtocol
from tests.helpers.server import serve_app_in_thread

TIMEOUT_S = 0.5


async def echo_app(scope, receive, send):  # noqa: ANN001, ANN201 - plain ASGI
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body) + 2).encode())]})
    await send({"type": "http.response.body", "body": b"ok" + body})


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=5)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading whatever it sent)."""
    sock.settimeout(seconds)
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


def _serve():
    return serve_app_in_thread(echo_app, http=HeaderTimeoutProtocol.with_timeout(TIMEOUT_S))


def test_a_connection_that_stops_mid_head_is_closed():
    with _serve() as url:
        idle, partial = _connect(url), _connect(url)
        partial.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-le")
        assert _closed_within(partial, TIMEOUT_S + 2)
        assert _closed_within(idle, 2)  # never sent a byte: same deadline


def test_a_complete_head_in_time_is_served_and_keep_alive_rearms():
    with _serve() as url:
        sock = _connect(url)
        for part in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
            sock.sendall(part)
            time.sleep(TIMEOUT_S / 4)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET / HTTP/1.1\r\nHo")  # the next request on the kept-alive connection
        assert _closed_within(sock, TIMEOUT_S + 2)


def test_a_slow_body_after_a_complete_head_is_not_cut_by_the_head_deadline():
    with _serve() as url:
        sock = _connect(url)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 5\r\n\r\nab")
        assert not _closed_within(sock, TIMEOUT_S * 3)
        sock.sendall(b"cde")
        sock.settimeout(5)
        reply = b""
        while not reply.endswith(b"okabcde"):  # the head and the body may come in two packets
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"okabcde"), reply


def test_with_timeout_refuses_nonsense():
    import pytest

    with pytest.raises(ValueError, match="positive"):
        HeaderTimeoutProtocol.with_timeout(0)


def test_serve_flag_sets_the_deadline():
    import pytest

    from pensieve.cli.main import build_parser
    from pensieve.cli.settings import settings_from_args

    def settings(*flags: str):
        return settings_from_args(build_parser().parse_args(["serve", "--device", "cpu", *flags]), {})

    assert settings().header_timeout_s == 30.0
    assert settings("--header-timeout", "2.5").header_timeout_s == 2.5
    with pytest.raises(ValueError, match="--header-timeout must be positive"):
        settings("--header-timeout", "0")
