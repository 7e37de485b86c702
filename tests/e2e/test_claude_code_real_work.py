"""Claude Code doing real work on a real coding model: `pensieve claude` with
Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, ASSETS.md) on this CPU.

In a temporary project, ``deploy/settings.toml`` holds a port number nobody could guess.
Claude Code is asked for it; the model must call a tool (Read, Grep or Bash) that Pensieve
produced as a ``tool_use``, Claude Code runs it and sends the ``tool_result``, and the final
answer carries the value. The session keeps to ``--tools Bash,Read`` (~4k tokens of prompt;
the model's trained context is 32k) and the server samples greedily for requests that send
no temperature, so the run is repeatable.
"""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.e2e.claude_cli import claude_env, headless_args, run_headless
from tests.helpers.real_server import pensieve_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PORT = "7341"
PROMPT = "What is the listen_port set in deploy/settings.toml?"
RUN_TIMEOUT_S = 900
SETTINGS = f"""[server]
host = "0.0.0.0"
listen_port = {PORT}
workers = 4
"""


@pytest.fixture(scope="module")
def qwen_server(qwen_coder_15b_gguf):
    with pensieve_server("--model", str(qwen_coder_15b_gguf), "--context-length", "16384",
                         "--default-temperature", "0") as url:
        yield url


def test_claude_code_reads_a_file_and_answers_with_its_value(claude_bin, qwen_server, tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    (work / "deploy").mkdir(parents=True)
    (work / "deploy" / "settings.toml").write_text(SETTINGS)
    served = httpx.get(f"{qwen_server}/v1/models").json()["data"][0]
    cmd = [sys.executable, "-m", "pensieve.cli.main", "claude", "--url", qwen_server,
           "--claude-bin", str(claude_bin), "--config-dir", str(home / "config"), "--",
           *headless_args(PROMPT, "--tools", "Bash,Read", "--allowedTools", "Bash,Read",
                          "--max-turns", "6")]
    env = claude_env(home, qwen_server, PENSIEVE_HOME=str(home / ".pensieve"),
                     CLAUDE_CODE_MAX_OUTPUT_TOKENS="512")
    del env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_API_KEY"]  # the launcher sets them
    run = run_headless(cmd, env, work, RUN_TIMEOUT_S)

    calls = run.blocks("assistant", "tool_use")
    results = run.blocks("user", "tool_result")
    assert calls, f"the model called no tool\n{run.describe()}"
    assert {c["name"] for c in calls} <= {"Read", "Bash", "Grep"}
    assert results and any(PORT in str(r.get("content")) for r in results), run.describe()
    assert list(run.result["modelUsage"]) == [served["id"]]
    assert run.returncode == 0 and not run.result["is_error"], run.describe()
    assert PORT in run.result["result"], run.describe()
