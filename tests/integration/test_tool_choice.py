"""tool_choice through the real server with the real SmolLM2, driven by the anthropic SDK.

Forced modes (``any``, ``tool``) must come back as ``tool_use`` blocks whose input validates
against the tool's ``input_schema`` — for every one of Claude Code's 24 default tools.
Prompts stay short (tool descriptions trimmed, no Claude Code system prompt) to keep this quick.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import anthropic
import jsonschema
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).parents[1] / "fixtures" / "claude_code_request.json"
GREEDY = {"temperature": 0}
SYSTEM = "You are a coding agent working in /home/user/project."


def claude_code_tools() -> list[dict]:
    """Claude Code's default tools, descriptions trimmed (the schemas are what is tested)."""
    tools = json.loads(FIXTURE.read_text())["tools"]
    return [dict(t, description=t["description"][:300]) for t in tools]


TOOLS = {t["name"]: t for t in claude_code_tools()}


@pytest.fixture(scope="module")
def client():
    with pensieve_server("--context-length", "4096", "--max-num-seqs", "24") as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0, timeout=900)


def ask(client, text: str, tools: list[dict], tool_choice: dict | None, max_tokens: int = 200):
    kwargs = {"tool_choice": tool_choice} if tool_choice else {}
    return client.messages.create(model="claude-sonnet-5", max_tokens=max_tokens, system=SYSTEM,
                                  messages=[{"role": "user", "content": text}], tools=tools,
                                  extra_body=GREEDY, **kwargs)


def tool_uses(msg):
    return [b for b in msg.content if b.type == "tool_use"]


def assert_valid_calls(msg, names: set[str]) -> list:
    uses = tool_uses(msg)
    for use in uses:
        assert use.name in names, use.name
        assert use.id.startswith("toolu_")
        jsonschema.validate(use.input, TOOLS[use.name]["input_schema"])
    assert (msg.stop_reason == "tool_use") == bool(uses), (msg.stop_reason, msg.content)
    return uses


def test_a_forced_call_is_schema_valid_for_every_claude_code_tool(client):
    def forced(name: str):
        return name, ask(client, f"Use the {name} tool.", [TOOLS[name]],
                         {"type": "tool", "name": name, "disable_parallel_tool_use": True})

    assert len(TOOLS) == 24
    with concurrent.futures.ThreadPoolExecutor(len(TOOLS)) as pool:  # one engine batch
        results = dict(pool.map(forced, TOOLS))
    for name, msg in results.items():
        uses = assert_valid_calls(msg, {name})
        assert msg.stop_reason == "tool_use" and len(uses) == 1, (name, msg.content)
        assert [b.type for b in msg.content] == ["tool_use"], name  # a forced call, nothing else


def test_tool_choice_any_calls_an_offered_tool(client):
    msg = ask(client, "Show me what is in README.md.", [TOOLS["Bash"], TOOLS["Read"]], {"type": "any"})
    assert len(assert_valid_calls(msg, {"Bash", "Read"})) >= 1


def test_tool_choice_tool_calls_that_tool(client):
    msg = ask(client, "Show me what is in README.md.", [TOOLS["Bash"], TOOLS["Read"]],
              {"type": "tool", "name": "Read"})
    uses = assert_valid_calls(msg, {"Read"})
    assert uses and all(u.name == "Read" for u in uses)


def test_disable_parallel_tool_use_gives_exactly_one_call(client):
    msg = ask(client, "List the files, then read README.md.", [TOOLS["Bash"], TOOLS["Read"]],
              {"type": "any", "disable_parallel_tool_use": True})
    assert len(assert_valid_calls(msg, {"Bash", "Read"})) == 1


def test_tool_choice_none_answers_in_text(client):
    msg = ask(client, "List the files here.", [TOOLS["Bash"]], {"type": "none"}, max_tokens=60)
    assert not tool_uses(msg) and msg.content and msg.content[0].type == "text"
    assert msg.stop_reason in ("end_turn", "max_tokens")


def test_tool_choice_auto_calls_are_valid_whenever_made(client):
    for text in ("What is 2 + 2?", "Run `ls` in the shell with the Bash tool."):
        msg = ask(client, text, [TOOLS["Bash"], TOOLS["Read"]], None)
        assert_valid_calls(msg, {"Bash", "Read"})
        assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_streamed_and_plain_forced_calls_agree(client):
    kwargs = dict(model="claude-haiku-4-5-20251001", max_tokens=200, system=SYSTEM, extra_body=GREEDY,
                  messages=[{"role": "user", "content": "Read README.md."}],
                  tools=[TOOLS["Read"]], tool_choice={"type": "tool", "name": "Read"})
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert "content_block_delta" in events
    assert [(u.name, u.input) for u in tool_uses(final)] == [(u.name, u.input) for u in tool_uses(plain)]
    assert final.stop_reason == plain.stop_reason == "tool_use"
    assert_valid_calls(final, {"Read"})
