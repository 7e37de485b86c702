"""``python -m tests.helpers.tiny_serve PORT [die]``: the real app and ``serve_http`` (signal
handling, exit status) over the tiny engine, in a process of its own. Each step sleeps 20 ms
so a stream is still running when a test signals the process; ``die`` kills the engine loop
after its 10th step (the way a broken device would)."""

from __future__ import annotations

import sys
import time

from pensieve.api import ApiConfig, create_app
from pensieve.chat import PromptRenderer
from pensieve.cli.http_server import serve_http
from pensieve.engine.client import EngineClient
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine


def main(port: int, mode: str) -> int:
    engine = tiny_engine()
    step, has_work, steps = engine.step, engine.has_work, [0]

    def slow_step():
        time.sleep(0.02)
        steps[0] += 1
        return step()

    def maybe_broken() -> bool:
        if mode == "die" and steps[0] >= 10:
            raise RuntimeError("simulated device loss")
        return has_work()

    engine.step, engine.has_work = slow_step, maybe_broken
    client = EngineClient(engine, "tiny-model")
    client.start()
    app = create_app(ApiConfig(model_id="tiny-model", context_length=512), client,
                     PromptRenderer(ByteTokenizer(), None))
    return serve_http(app, client, "127.0.0.1", port, "warning")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else ""))
