"""The real Claude Code CLI against the real app over a scripted token source.

The model is the only double: its replies go through SmolLM2's tokenizer, the incremental
detokenizer, the streaming segmenter, the Hermes tool parser, the event builder and SSE, and
Claude Code — the real binary — runs the tool call it receives.
"""

from __future__ import annotations

import json

import pytest

from pensieve.protocol import MessageCreateParams
from tests.e2e.claude_cli import claude_env, headless_args, run_headless

pytestmark = pytest.mark.e2e

# The shell must run this for the marker to appear: `$((6*7))` only becomes 42 in a shell.
COMMAND = "echo pensieve-e2e-marker-$((6*7))"
OUTPUT = "pensieve-e2e-marker-42"
TOOL_CALL = ('<tool_call>\n{"name": "Bash", "arguments": {"command": "' + COMMAND
             + '", "description": "Print the e2e marker"}}\n</tool_call>')
FINAL = f"The command printed {OUTPUT}."
RUN_TIMEOUT_S = 120


def marker_script(prompt: str) -> str:
    """First turn: a Bash call in Hermes format; once its output is in the prompt: an answer."""
    if OUTPUT in prompt:
        return FINAL
    if '"Bash"' in prompt:  # the main conversation offers tools; side requests do not
        return TOOL_CALL
    return "OK"


def tool_use_and_result(body: dict) -> tuple[dict, dict]:
    """The assistant tool_use and the user tool_result blocks of a follow-up request."""
    blocks = [b for m in body["messages"] if isinstance(m["content"], list) for b in m["content"]]
    uses = [b for b in blocks if b.get("type") == "tool_use"]
    results = [b for b in blocks if b.get("type") == "tool_result"]
    assert len(uses) == 1 and len(results) == 1, json.dumps(body["messages"])[:2000]
    return uses[0], results[0]


def result_text(block: dict) -> str:
    content = block.get("content")
    if isinstance(content, list):
        return "".join(c.get("text", "") for c in content)
    return str(content)


def test_bash_tool_round_trip(claude_bin, scripted_server, tmp_path):
    with scripted_server(marker_script) as (url, engine, recorder):
        run = run_headless(
            [str(claude_bin), *headless_args("Run the e2e marker command.",
                                             "--tools", "Bash,Read", "--allowedTools", "Bash")],
            claude_env(tmp_path / "home", url), tmp_path / "work", RUN_TIMEOUT_S)
    assert run.returncode == 0, run.describe()
    # The server turned the Hermes text into a tool_use block Claude Code understood …
    streamed = run.blocks("assistant", "tool_use")
    assert [(b["name"], b["input"]["command"]) for b in streamed] == [("Bash", COMMAND)]
    assert streamed[0]["id"].startswith("toolu_")
    # … Claude Code ran it (only a shell turns $((6*7)) into 42) and sent the output back …
    bodies = [b for b in recorder.messages_bodies() if b.get("tools")]
    assert len(bodies) == 2, [len(b["messages"]) for b in bodies]
    use, result = tool_use_and_result(bodies[1])
    assert use["id"] == result["tool_use_id"] == streamed[0]["id"]
    assert use["input"]["command"] == COMMAND and not result.get("is_error")
    assert OUTPUT in result_text(result)
    # … and the next turn completed with the answer that saw it.
    assert [c.reply for c in engine.calls if OUTPUT in c.prompt] == [FINAL]
    assert run.result["subtype"] == "success" and not run.result["is_error"]
    assert OUTPUT in run.result["result"]
    assert [b["text"] for b in run.blocks("assistant", "text")][-1] == FINAL


def test_default_tool_set_request_is_served(claude_bin, scripted_server, smol_renderer, tmp_path):
    """Claude Code's full default request (every default tool) through the real app; its
    rendered size with SmolLM2's template is what the context options must make room for."""
    with scripted_server(lambda prompt: "Hello from Pensieve.") as (url, engine, recorder):
        run = run_headless([str(claude_bin), *headless_args("hi")],
                           claude_env(tmp_path / "home", url), tmp_path / "work", RUN_TIMEOUT_S)
    assert run.returncode == 0, run.describe()
    assert run.result["result"] == "Hello from Pensieve."
    body = max(recorder.messages_bodies(), key=lambda b: len(b.get("tools") or ()))
    names = [t["name"] for t in body["tools"]]
    assert "Bash" in names and len(names) >= 10
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
    tokens = smol_renderer.render(MessageCreateParams.model_validate(body)).num_tokens
    print(f"\nClaude Code default request: {len(names)} tools, "
          f"{len(json.dumps(body['tools']))} chars of tool JSON, {tokens} SmolLM2 tokens")
    assert tokens > 8192  # more than SmolLM2's trained context: hence --context-length 32768
