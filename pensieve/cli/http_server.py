"""uvicorn for a built app: a draining shutdown on SIGTERM/SIGINT, exit 1 when the engine dies."""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("pensieve")

SHUTDOWN_GRACE_S = 5  # how long running responses may take to end after SIGTERM/SIGINT


def serve_http(app, client, host: str, port: int, log_level: str,  # noqa: ANN001
               header_timeout_s: float = 30.0) -> int:
    """uvicorn until SIGTERM/SIGINT or the engine's death. On the signal every running
    generation first ends with an error (streams get an ``error`` event, not a cut
    connection), then uvicorn shuts down gracefully (and re-raises the signal). When the engine
    loop dies its callers have already been ended: the server stops and 1 is returned, for a
    supervisor to restart it; a hard exit follows if the graceful shutdown hangs."""
    import uvicorn

    from pensieve.cli.http_protocol import HeaderTimeoutProtocol

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
            if not self.should_exit:
                client.drain("the server is shutting down")
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                            http=HeaderTimeoutProtocol.with_timeout(header_timeout_s))
    server = DrainingServer(config)

    def on_death(reason: str) -> None:
        log.critical("the engine stopped (%s): shutting the server down", reason)
        server.should_exit = True
        threading.Thread(target=_exit_later, name="pensieve-exit", daemon=True).start()

    client.on_death = on_death
    try:
        if client.dead_reason is None:
            server.run()
    finally:
        client.shutdown()
    if client.dead_reason is not None and not client.drained:
        log.critical("exiting with status 1: the engine stopped (%s)", client.dead_reason)
        return 1
    return 0


def _exit_later() -> None:
    time.sleep(SHUTDOWN_GRACE_S + 10)
    log.critical("graceful shutdown did not finish; exiting with status 1")
    os._exit(1)
