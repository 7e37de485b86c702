"""The 2026 request surface over the real app (scripted engine, CharTokenizer), driven by the
anthropic SDK: every new field and block is accepted (never a 400/500), rendered where it
means something, and ``count_tokens`` counts exactly the prompt generation runs on."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import pytest

from tests.helpers.api_fakes import CharTokenizer, ScriptedEngine, fake_server, text_script

MODEL = "claude-sonnet-5"
BETAS = ["claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27",
         "structured-outputs-2025-11-13", "mid-conversation-tool-changes-2026-07-01", "compact-2026-09-04",
         "thinking-display-updates-2026-08-18", "inline-tools-2026-09-15", "effort-2025-11-24",
         "thinking-token-count-2026-05-13", "model-context-window-exceeded-2025-08-26", "a-beta-from-2027-01-01"]
BASH = {"name": "Bash", "description": "Run a shell command", "strict": True,
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        "input_examples": [{"command": "ls"}], "eager_input_streaming": True, "allowed_callers": ["direct"],
        "cache_control": {"type": "ephemeral", "ttl": "1h"}}
DEFERRED = {"name": "GrepDeferredTool", "description": "Search files (SECRET-DEFERRED-DESCRIPTION)",
            "defer_loading": True, "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}}}
DOCUMENT = {"type": "document", "title": "Notes", "context": "from the wiki",
            "source": {"type": "text", "media_type": "text/plain", "data": "DOC-BODY-TEXT"}}
CONTENT_DOCUMENT = {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "CONTENT-DOC"}]}}
PDF = {"type": "document", "title": "Paper", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
SEARCH_RESULT = {"type": "search_result", "source": "https://kb.example/1", "title": "KB article",
                 "content": [{"type": "text", "text": "SEARCH-RESULT-TEXT"}], "citations": {"enabled": True}}
WEB_SEARCH = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": [
    {"type": "web_search_result", "url": "https://news.example", "title": "WEB-SEARCH-TITLE",
     "encrypted_content": "abc", "page_age": "2 days"}]}
WEB_SEARCH_ERROR = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_2",
                    "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}}
WEB_FETCH = {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_3", "content": {
    "type": "web_fetch_result", "url": "https://page.example", "retrieved_at": "2026-12-01T00:00:00Z",
    "content": {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "FETCHED-PAGE"}}}}
SERVER_TOOL_USE = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}}


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=30)


def prompt_of(engine: ScriptedEngine, call: int = -1) -> str:
    return CharTokenizer().decode(engine.calls[call].prompt_ids)


def everything() -> dict[str, Any]:
    """One request with every field and block of the 2026 surface."""
    return {
        "model": MODEL, "max_tokens": 64,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.0.abc;"},
                   {"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "tools": [BASH, DEFERRED, {"type": "web_search_20260209", "name": "web_search", "max_uses": 3},
                  {"type": "tool_search_tool_regex_20251119", "name": "tool_search"}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look things up."}, DOCUMENT, CONTENT_DOCUMENT, PDF,
                                         SEARCH_RESULT, {"type": "container_upload", "file_id": "file_123"},
                                         {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "thinking", "thinking": "", "signature": "pensieve1s:not-ours.AAAA"},
                SERVER_TOOL_USE, WEB_SEARCH, WEB_SEARCH_ERROR, WEB_FETCH,
                {"type": "code_execution_tool_result", "tool_use_id": "srvtoolu_9", "content": {"type": "x"}},
                {"type": "text", "text": "Found it."}]},
            {"role": "system", "content": [{"type": "text", "text": "MID-CONVERSATION-SYSTEM"},
                                           {"type": "tool_removal", "tool": {"type": "tool_reference", "tool_name": "Bash"}}],
             "output_config": {"effort": "low"}},
            {"role": "user", "content": [{"type": "text", "text": "Thanks, go on."}]},
        ],
        "thinking": {"type": "adaptive", "display": "omitted"},
        "output_config": {"effort": "max"},
        "cache_control": {"type": "ephemeral", "ttl": "1h"},
        "service_tier": "standard_only", "inference_geo": "eu", "container": "container_abc",
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "metadata": {"user_id": "session_1"}, "speed": "standard", "diagnostics": {"cache": True},
    }


def test_every_new_field_and_block_is_accepted_and_rendered_where_it_means_something() -> None:
    engine = ScriptedEngine(text_script("ok"))
    body = everything()
    with fake_server(engine) as url:
        headers = {"anthropic-beta": ",".join(BETAS), "anthropic-version": "2023-06-01"}
        reply = httpx.post(f"{url}/v1/messages?beta=true", json=body, headers=headers, timeout=30)
        count = httpx.post(f"{url}/v1/messages/count_tokens?beta=true", headers=headers, timeout=30,
                           json={k: v for k, v in body.items() if k != "max_tokens"})
        streamed = sdk(url).messages.stream(**{k: v for k, v in body.items() if k in ("model", "max_tokens", "messages")},
                                            extra_body={k: v for k, v in body.items()
                                                        if k not in ("model", "max_tokens", "messages")},
                                            extra_headers=headers)
        with streamed as stream:
            final = stream.get_final_message()
    assert reply.status_code == 200, reply.text
    assert count.status_code == 200, count.text
    message = reply.json()
    usage = message["usage"]
    assert count.json()["input_tokens"] == usage["input_tokens"] == len(engine.calls[0].prompt_ids)
    assert final.content[0].text == "ok" and final.usage.input_tokens == usage["input_tokens"]
    prompt = prompt_of(engine, 0)
    for shown in ("DOC-BODY-TEXT", "from the wiki", "CONTENT-DOC", "[document: Paper]", "SEARCH-RESULT-TEXT",
                  "KB article", "[file uploaded: file_123]", "WEB-SEARCH-TITLE", "https://news.example",
                  "[web search failed: max_uses_exceeded]", "FETCHED-PAGE", "MID-CONVERSATION-SYSTEM", "Found it."):
        assert shown in prompt, shown
    for hidden in ("opaque", "SECRET-DEFERRED-DESCRIPTION", "x-anthropic-billing-header", "srvtoolu", "not-ours"):
        assert hidden not in prompt, hidden
    assert '"input_examples"' not in prompt and '"strict"' not in prompt  # tool fields that mean nothing to a template


def test_deferred_tools_stay_out_of_the_prompt_until_a_tool_reference_loads_them() -> None:
    engine = ScriptedEngine(text_script("ok"))
    ask = [{"role": "user", "content": "Find TODOs."}]
    loaded = [*ask,
              {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "tool_search",
                                                 "input": {"query": "grep"}}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                  {"type": "tool_reference", "tool_name": "GrepDeferredTool"}]}]}]
    with fake_server(engine) as url:
        client = sdk(url)
        deferred_count = client.messages.count_tokens(model=MODEL, messages=ask, tools=[BASH, DEFERRED]).input_tokens
        bash_only = client.messages.count_tokens(model=MODEL, messages=ask, tools=[BASH]).input_tokens
        client.messages.create(model=MODEL, max_tokens=20, messages=ask, tools=[BASH, DEFERRED])
        before = prompt_of(engine)
        reply = client.messages.create(model=MODEL, max_tokens=20, messages=loaded, tools=[BASH, DEFERRED])
        after = prompt_of(engine)
        loaded_count = client.messages.count_tokens(model=MODEL, messages=loaded, tools=[BASH, DEFERRED]).input_tokens
    assert deferred_count == bash_only  # a deferred tool costs nothing until loaded
    assert "GrepDeferredTool" not in before and "SECRET-DEFERRED-DESCRIPTION" not in before
    assert "SECRET-DEFERRED-DESCRIPTION" in after and "[tool loaded: GrepDeferredTool]" in after
    assert loaded_count == reply.usage.input_tokens


def test_a_tool_addition_directive_loads_a_deferred_tool() -> None:
    engine = ScriptedEngine(text_script("ok"))
    messages = [{"role": "user", "content": "hi"},
                {"role": "system", "content": [{"type": "tool_addition",
                                                "tool": {"type": "tool_reference", "tool_name": "GrepDeferredTool"}}]},
                {"role": "user", "content": "search"}]
    with fake_server(engine) as url:
        sdk(url).messages.create(model=MODEL, max_tokens=20, messages=messages, tools=[DEFERRED])
    assert "SECRET-DEFERRED-DESCRIPTION" in prompt_of(engine)


def test_a_system_message_cleared_at_the_next_user_message_is_shown_only_until_then() -> None:
    engine = ScriptedEngine(text_script("ok"))
    reminder = {"role": "system", "content": "ONE-TURN-REMINDER", "clear_at": "next_user_message"}
    first = [{"role": "user", "content": "hi"}, reminder]
    later = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
    with fake_server(engine) as url:
        client = sdk(url)
        client.messages.create(model=MODEL, max_tokens=20, messages=first)
        shown = prompt_of(engine)
        reply = client.messages.create(model=MODEL, max_tokens=20, messages=later)
        count = client.messages.count_tokens(model=MODEL, messages=later).input_tokens
    assert "ONE-TURN-REMINDER" in shown
    assert "ONE-TURN-REMINDER" not in prompt_of(engine)
    assert count == reply.usage.input_tokens


@pytest.mark.parametrize("block", [DOCUMENT, SEARCH_RESULT, WEB_FETCH, WEB_SEARCH,
                                   {"type": "tool_reference", "tool_name": "Bash"},
                                   {"type": "container_upload", "file_id": "f"}, {"type": "redacted_thinking", "data": "x"},
                                   {"type": "search_result", "source": "s", "title": "t", "content": "plain"},
                                   {"type": "web_fetch_tool_result", "tool_use_id": "t", "content": None}])
def test_count_tokens_equals_input_tokens_for_each_block(block: dict) -> None:
    engine = ScriptedEngine(text_script("ok"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "see"}, block]}]
    with fake_server(engine) as url:
        client = sdk(url)
        count = client.messages.count_tokens(model=MODEL, messages=messages, tools=[BASH]).input_tokens
        reply = client.messages.create(model=MODEL, max_tokens=20, messages=messages, tools=[BASH])
    assert count == reply.usage.input_tokens == len(engine.calls[0].prompt_ids)


def test_a_malformed_new_block_is_a_clear_400_not_a_500() -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine) as url:
        reply = httpx.post(f"{url}/v1/messages", timeout=30, json={
            "model": MODEL, "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "tool_reference"}]}]})
    assert reply.status_code == 400
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "invalid_request_error"
    assert "tool_name" in reply.json()["error"]["message"]


def test_mid_conversation_tool_changes_apply_in_order_and_leave_a_note() -> None:
    engine = ScriptedEngine(text_script("ok"))
    inline = {"name": "InlineTool", "description": "INLINE-TOOL-DESCRIPTION",
              "input_schema": {"type": "object", "properties": {}}}

    def change(kind: str, tool: dict) -> dict:
        return {"role": "system", "content": [{"type": kind, "tool": tool}]}

    messages = [{"role": "user", "content": "hi"},
                change("tool_addition", {"type": "tool_definition", "definition": inline}),
                change("tool_removal", {"type": "tool_reference", "name": "Bash"}),
                change("tool_addition", {"type": "mcp_toolset_reference", "server_name": "srv"}),
                change("tool_removal", {"type": "tool_reference", "name": "NoSuchTool"}),
                {"role": "user", "content": "go"}]
    with fake_server(engine) as url:
        client = sdk(url)
        reply = client.messages.create(model=MODEL, max_tokens=20, messages=messages, tools=[BASH])
        changed = prompt_of(engine)
        back = [*messages[:-1], change("tool_addition", {"type": "tool_reference", "name": "Bash"}), messages[-1]]
        client.messages.create(model=MODEL, max_tokens=20, messages=back, tools=[BASH])
        restored = prompt_of(engine)
        count = client.messages.count_tokens(model=MODEL, messages=messages, tools=[BASH]).input_tokens
    tools_section = changed.split("</tools>")[0]
    assert "INLINE-TOOL-DESCRIPTION" in tools_section and "Run a shell command" not in tools_section
    assert "[tool added: InlineTool]" in changed and "[tool removed: Bash]" in changed
    assert "Run a shell command" in restored.split("</tools>")[0]
    assert count == reply.usage.input_tokens


ODD_BLOCKS = [
    {"type": "search_result", "source": "s", "title": "t", "content": ["not a block", 3, {"type": "text"}]},
    {"type": "web_search_tool_result", "tool_use_id": "x", "content": ["a string", None, {"title": 1}]},
    {"type": "web_search_tool_result", "tool_use_id": "x", "content": "unexpected"},
    {"type": "web_fetch_tool_result", "tool_use_id": "x", "content": {"type": "web_fetch_result", "content": "x"}},
    {"type": "web_fetch_tool_result", "tool_use_id": "x", "content": {"type": "web_fetch_result",
                                                                      "content": {"source": "not a dict"}}},
    {"type": "document", "source": {"type": "content", "content": "plain string content"}},
    {"type": "document", "source": {"type": "text"}},
    {"type": "tool_addition", "tool": "Bash"},
    {"type": "tool_addition", "tool": {"type": "tool_definition", "definition": {"name": "no schema"}}},
    {"type": "tool_removal"},
    {"type": "container_upload"},
]


@pytest.mark.parametrize("block", ODD_BLOCKS)
def test_odd_shapes_of_new_blocks_are_served_or_refused_clearly(block: dict) -> None:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine) as url:
        body = {"model": MODEL, "max_tokens": 5, "tools": [BASH],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, block]}]}
        reply = httpx.post(f"{url}/v1/messages", json=body, timeout=30)
        count = httpx.post(f"{url}/v1/messages/count_tokens", json=body, timeout=30)
    assert reply.status_code in (200, 400), reply.text  # never a 500
    if reply.status_code == 400:  # a shape the API refuses too (a list of blocks holding a number)
        assert reply.json()["error"]["type"] == "invalid_request_error" and count.status_code == 400
    else:
        assert count.json()["input_tokens"] == reply.json()["usage"]["input_tokens"]
