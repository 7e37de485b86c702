"""The real Claude Code CLI, started by `pensieve claude`, against the real `pensieve serve`
with the default model (SmolLM2-135M-Instruct, its trained 8k context, default weights).

Claude Code's default tool set renders to more than 8k tokens, so the session keeps to
``--tools Bash,Read`` (~4k tokens of system prompt and tools). Claude Code sends no
temperature; the server here runs greedy for such requests (``--default-temperature 0``).
The question has one short right answer: a 135M model under a 4k-token agent prompt answers
it and ends its turn, where an open prompt ("Say hi.") sets it rambling past Claude Code's
per-turn cap (measured: 0 of 8 prompt variants ended within 512 tokens greedy; 2 of 8 with
the DRY loop guard at allowed length 3). Claude Code sends its environment block as a system message *after*
the user's prompt; the renderer puts it ahead of the prompt's words (chat/messages.py) —
rendered in place, the model answered the environment block instead of the question.
"""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.e2e.claude_cli import claude_env, headless_args, run_headless

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MAX_OUTPUT_TOKENS = 128
PROMPT = "What is the capital of France?"
RUN_TIMEOUT_S = 300


def launcher_session(claude_bin, url: str, home, work):
    cmd = [sys.executable, "-m", "pensieve.cli.main", "claude", "--url", url,
           "--claude-bin", str(claude_bin), "--config-dir", str(home / "config"), "--",
           *headless_args(PROMPT, "--tools", "Bash,Read")]
    env = claude_env(home, url, PENSIEVE_HOME=str(home / ".pensieve"),
                     CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(MAX_OUTPUT_TOKENS))
    del env["ANTHROPIC_BASE_URL"], env["ANTHROPIC_API_KEY"]  # the launcher sets them
    return run_headless(cmd, env, work, RUN_TIMEOUT_S)


def test_claude_p_with_the_default_model_completes(claude_bin, default_server_url, tmp_path):
    served = httpx.get(f"{default_server_url}/v1/models").json()["data"][0]
    assert served["max_input_tokens"] == 8192
    run = launcher_session(claude_bin, default_server_url, tmp_path / "home", tmp_path / "work")
    result = run.result
    # the launcher's model mapping: Claude Code asked for the served model by its id
    usage = result["modelUsage"]
    assert list(usage) == [served["id"]], usage
    prompt_tokens = sum(usage[served["id"]].get(k, 0) for k in
                        ("inputTokens", "cacheReadInputTokens", "cacheCreationInputTokens"))
    assert prompt_tokens > 1000, usage  # the real system prompt and tools went through
    model_turns = [e["message"] for e in run.events if e.get("type") == "assistant"
                   and e["message"].get("model") == served["id"]]
    assert model_turns and all(m["content"] for m in model_turns)
    assert run.returncode == 0, run.describe()
    assert result["subtype"] == "success" and not result["is_error"]
    assert result["result"].strip()
    final_texts = [b["text"] for b in model_turns[-1]["content"] if b.get("type") == "text"]
    assert final_texts and final_texts[-1].strip() == result["result"].strip()
    assert "paris" in result["result"].lower(), result["result"]
