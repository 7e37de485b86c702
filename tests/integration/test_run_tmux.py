"""``pensieve run`` in a real terminal (tmux): it starts a background server when none answers,
streams each answer, keeps the conversation across turns, and ``/bye`` exits."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.server import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")]


class Pane:
    def __init__(self, socket: str, command: str) -> None:
        self.socket = socket
        self._tmux("new-session", "-d", "-s", "chat", "-x", "180", "-y", "60", command)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True).stdout

    def text(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", "chat")

    def send(self, line: str) -> None:
        self._tmux("send-keys", "-t", "chat", "-l", line)
        self._tmux("send-keys", "-t", "chat", "Enter")

    def wait_for(self, predicate, timeout: float, what: str) -> str:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if predicate(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"{what} not seen in {timeout:g} s; the pane:\n{self.text()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def _answer_after(text: str, question: str) -> str:
    """What the pane shows between ``question`` and the next prompt (None-safe: '')."""
    tail = text.split(question, 1)[1] if question in text else ""
    return tail.split(">>>", 1)[0].strip()


def test_run_chats_streams_and_remembers(tmp_path: Path) -> None:
    port = free_port()
    env = f"PENSIEVE_HOME={shlex.quote(str(tmp_path))}"
    cmd = (f"{env} {shlex.quote(sys.executable)} -m pensieve.cli.main run "
           f"--url http://127.0.0.1:{port} --max-tokens 300; echo EXITED=$?; sleep 600")
    pane = Pane(f"pensieve-test-{os.getpid()}", cmd)
    try:
        pane.wait_for(lambda t: "chatting with SmolLM2-135M-Instruct" in t and t.rstrip()
                      .endswith(">>>"), 600, "the chat prompt")
        q1 = "What is the capital of France?"
        pane.send(q1)
        text = pane.wait_for(lambda t: t.count(">>>") >= 2, 120, "the first answer")
        assert "Paris" in _answer_after(text, q1)

        q2 = "And of Germany?"  # answerable only with the first turn in the conversation
        pane.send(q2)
        text = pane.wait_for(lambda t: t.count(">>>") >= 3, 120, "the second answer")
        assert "Berlin" in _answer_after(text, q2)

        pane.send('"""Write a long poem')  # several lines between triple quotes: one turn
        q3 = 'about the sea, with many verses."""'
        pane.send(q3)
        partials = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            text = pane.text()
            if text.count(">>>") >= 4:
                break
            if _answer_after(text, q3):
                partials.add(_answer_after(text, q3))
        final = _answer_after(pane.text(), q3)
        growing = [p for p in partials if p != final and final.startswith(p)]
        assert len(growing) >= 2, f"the answer did not stream: {sorted(partials)}"
        assert len(final.split()) > 20

        pane.send("/bye")
        pane.wait_for(lambda t: "EXITED=0" in t, 30, "the exit")
    finally:
        pane.close()
        subprocess.run([sys.executable, "-m", "pensieve.cli.main", "stop"], capture_output=True,
                       env={**os.environ, "PENSIEVE_HOME": str(tmp_path)}, timeout=60)
    assert not (tmp_path / "server.pid").exists()
