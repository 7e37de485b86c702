"""gpt-oss's harmony format: channels → thinking / text / tool_use (split at every boundary),
the call grammar under each tool_choice (on a vocabulary with harmony's special tokens), the
stream's blocks and stop reasons, the real template's rendering of our conversations and
reasoning effort, and a harmony vocabulary's end-of-turn tokens."""

from __future__ import annotations

import copy
import json

import pytest

from pensieve.chat import MessageEventBuilder, PromptRenderer, collect_message, message_events
from pensieve.chat.segments import TextSegment, ThinkingSegment, ToolCallDelta, ToolCallEnd, ToolCallStart
from pensieve.chat.stream import make_segmenter
from pensieve.chat.thinking import ThinkingPlan, ThinkingSigner
from pensieve.chat.tool_parsers.harmony import HARMONY_THINKING
from pensieve.chat.tools_prompt import ToolsPlan
from pensieve.engine.types import FinishReason, GenerationDelta
from pensieve.protocol import MessageCreateParams, ToolParam
from tests.helpers.api_fakes import CharTokenizer
from tests.unit.test_chat_template_parity import real_templates_dir

BASH_SCHEMA = {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
               "required": ["command"], "additionalProperties": False}
READ_SCHEMA = {"type": "object", "properties": {"file_path": {"type": "string"}},
               "required": ["file_path"], "additionalProperties": False}
BASH = ToolParam(name="Bash", input_schema=BASH_SCHEMA)
READ = ToolParam(name="Read", input_schema=READ_SCHEMA)
TOOLS = ToolsPlan("harmony", (BASH, READ), native=True)
THINKS = ThinkingPlan(requested=True, markers=HARMONY_THINKING)
ARGS = {"command": 'ls -la "my dir" <x>', "timeout": 5}


def call(name: str, args: dict, *, channel_first: bool = True, constrain: bool = True) -> str:
    body = json.dumps(args, ensure_ascii=False)
    if channel_first:
        return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{body}"
    kind = "<|constrain|>json" if constrain else "json"
    return f" to=functions.{name}<|channel|>commentary {kind}<|message|>{body}"


ANALYSIS = "<|channel|>analysis<|message|>The user wants a listing.\nUse Bash.<|end|><|start|>assistant"
FINAL = "<|channel|>final<|message|>Here it is:\n\n- a\n- b"

# (generated text, thinking, text, calls)
CASES = [
    (ANALYSIS + call("Bash", ARGS) + "<|call|>", "The user wants a listing.\nUse Bash.", "", [("Bash", ARGS, True)]),
    (call("Bash", ARGS), "", "", [("Bash", ARGS, True)]),
    (ANALYSIS + call("Read", {"file_path": "/a b"}, channel_first=False), "The user wants a listing.\nUse Bash.", "",
     [("Read", {"file_path": "/a b"}, True)]),
    (call("Read", {"file_path": "x"}, channel_first=False, constrain=False) + "<|call|>", "", "",
     [("Read", {"file_path": "x"}, True)]),
    (ANALYSIS + FINAL + "<|return|>", "The user wants a listing.\nUse Bash.", "Here it is:\n\n- a\n- b", []),
    (FINAL, "", "Here it is:\n\n- a\n- b", []),
    ("<|channel|>commentary<|message|>Listing now.<|end|><|start|>assistant" + call("Bash", ARGS),
     "", "Listing now.", [("Bash", ARGS, True)]),
]


def segment(pieces: list[str], tools: ToolsPlan | None = TOOLS) -> tuple[str, str, list[tuple[str, dict, bool]]]:
    seg = make_segmenter(tools, THINKS)
    out = [s for piece in pieces for s in seg.feed(piece)] + seg.finish()
    thinking, text, calls, name, args = [], [], [], "", ""
    for s in out:
        if isinstance(s, ThinkingSegment):
            thinking.append(s.text)
        elif isinstance(s, TextSegment):
            text.append(s.text)
        elif isinstance(s, ToolCallStart):
            name, args = s.name, ""
        elif isinstance(s, ToolCallDelta):
            args += s.partial_json
        elif isinstance(s, ToolCallEnd):
            calls.append((name, json.loads(args), s.complete))
    return "".join(thinking), "".join(text), calls


@pytest.mark.parametrize(("text", "thinking", "answer", "calls"), CASES)
def test_channels_split_at_every_boundary(text: str, thinking: str, answer: str, calls: list) -> None:
    want = (thinking, answer, calls)
    assert segment([text]) == want
    assert segment(list(text)) == want
    for cut in range(1, len(text)):
        assert segment([text[:cut], text[cut:]]) == want, cut


def test_headers_never_reach_the_text_without_tools() -> None:
    text = ANALYSIS + FINAL + "<|return|>"
    assert segment(list(text), tools=None) == ("The user wants a listing.\nUse Bash.", "Here it is:\n\n- a\n- b", [])


def test_a_call_that_is_cut_short_is_closed_by_repair() -> None:
    cut = call("Bash", ARGS)[:-9]  # ends inside the key "timeout"
    assert segment([cut]) == ("", "", [("Bash", {"command": 'ls -la "my dir" <x>'}, False)])


# -- the stream ------------------------------------------------------------------------------

def deltas(text: str, finish: FinishReason) -> list[GenerationDelta]:
    chunks = [text[i:i + 4] for i in range(0, len(text), 4)]
    items = [GenerationDelta("r", text=c, num_output_tokens=n, num_prompt_tokens=7) for n, c in enumerate(chunks, 1)]
    return items + [GenerationDelta("r", text="", finish_reason=finish, num_output_tokens=len(chunks) + 1,
                                    num_prompt_tokens=7)]


async def collect(text: str, finish: FinishReason = FinishReason.EOS, tools: ToolsPlan | None = TOOLS):
    async def gen():
        for d in deltas(text, finish):
            yield d

    builder = MessageEventBuilder(message_id="m", model="gpt-oss", input_tokens=7, tools=tools,
                                  thinking=THINKS, thinking_key=b"key")
    events = [e async for e in message_events(gen(), builder)]

    async def replay():
        for e in events:
            yield e

    return events, await collect_message(replay())


async def test_a_call_streams_as_a_signed_thinking_block_then_tool_use() -> None:
    events, message = await collect(ANALYSIS + call("Bash", ARGS))  # <|call|> is the EOS
    assert [b.type for b in message.content] == ["thinking", "tool_use"]
    thought = message.content[0]
    assert thought.thinking == "The user wants a listing.\nUse Bash." and ThinkingSigner(b"key").verify(
        thought.thinking, thought.signature)
    assert message.content[1].name == "Bash" and message.content[1].input == ARGS
    assert message.stop_reason == "tool_use"
    parts = [e.delta.partial_json for e in events if e.type == "content_block_delta"
             and e.delta.type == "input_json_delta"]
    assert len(parts) > 3 and json.loads("".join(parts)) == ARGS  # incremental


async def test_no_thinking_block_when_the_request_did_not_ask_for_thinking() -> None:
    async def gen():
        for d in deltas(ANALYSIS + FINAL, FinishReason.EOS):
            yield d

    plan = ThinkingPlan(requested=False, markers=HARMONY_THINKING)
    builder = MessageEventBuilder(message_id="m", model="gpt-oss", input_tokens=7, thinking=plan)
    message = await collect_message(message_events(gen(), builder))
    assert [(b.type, b.text) for b in message.content] == [("text", "Here it is:\n\n- a\n- b")]
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0


async def test_a_final_answer_ends_the_turn() -> None:
    _, message = await collect(ANALYSIS + FINAL)  # <|return|> is the EOS
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[1].text == "Here it is:\n\n- a\n- b" and message.stop_reason == "end_turn"


# -- the grammar -----------------------------------------------------------------------------

xgr = pytest.importorskip("xgrammar")
from tests.helpers.special_vocab import grammar_accepts  # noqa: E402


@pytest.fixture(scope="module")
def compiler():
    from pensieve.engine.grammar import GrammarCompiler
    from tests.helpers.special_vocab import harmony_tokenizer

    tok = harmony_tokenizer()
    return tok, GrammarCompiler(tok, tok.vocab_size)


accepts = grammar_accepts  # tests/helpers/special_vocab.py


def grammar(choice: str = "any", name: str | None = None, thinking: bool = False):
    from pensieve.chat.tool_grammar import tool_call_grammar

    spec = tool_call_grammar([BASH, READ], choice=choice, forced_name=name, tool_format="harmony", thinking=thinking)
    assert spec is not None
    return spec


# What the grammar sees of an analysis message: the thinking tracker hides its body and <|end|>.
SEEN_ANALYSIS = "<|channel|>analysis<|message|><|start|>assistant"
BAD = [call("Write", ARGS), call("Bash", {"timeout": 5}), call("Bash", {"command": "ls", "timeout": "soon"}),
       call("Bash", {"command": "ls", "user": "root"})]


def test_special_tokens_are_single_tokens(compiler) -> None:
    tok, _ = compiler
    assert len(tok.encode("<|channel|><|message|><|call|>")) == 3


def test_forced_grammar_takes_one_valid_call_after_analysis_only_when_thinking(compiler) -> None:
    spec = grammar("any", thinking=True)
    for text in (call("Bash", ARGS), SEEN_ANALYSIS + call("Bash", ARGS), call("Read", {"file_path": "x"}, channel_first=False)):
        assert accepts(compiler, spec, text), text
    assert not accepts(compiler, spec, SEEN_ANALYSIS * 2 + call("Bash", ARGS), complete=False)  # one, then the call
    plain = grammar("any")  # no thinking asked for: the call comes at once
    assert accepts(compiler, plain, call("Bash", ARGS))
    assert not accepts(compiler, plain, SEEN_ANALYSIS + call("Bash", ARGS), complete=False)
    assert not accepts(compiler, spec, "")
    assert not accepts(compiler, spec, FINAL, complete=False)
    assert not accepts(compiler, spec, call("Bash", ARGS) + "<|start|>assistant", complete=False)  # one call
    for bad in BAD:
        assert not accepts(compiler, spec, bad, complete=False), bad


def test_named_tool_grammar(compiler) -> None:
    spec = grammar("tool", "Read")
    assert accepts(compiler, spec, call("Read", {"file_path": "x"}))
    assert not accepts(compiler, spec, call("Bash", ARGS), complete=False)


def test_auto_grammar_lets_the_answer_through_and_constrains_calls(compiler) -> None:
    spec = grammar("auto")
    assert accepts(compiler, spec, SEEN_ANALYSIS + FINAL)
    assert accepts(compiler, spec, SEEN_ANALYSIS + call("Bash", ARGS))
    assert accepts(compiler, spec, "<|channel|>commentary<|message|>Listing.<|end|><|start|>assistant" + call("Bash", ARGS))
    for bad in BAD:
        assert not accepts(compiler, spec, SEEN_ANALYSIS + bad, complete=False), bad


def test_what_the_grammar_accepts_the_parser_reads_back(compiler) -> None:
    text = call("Bash", ARGS)
    assert accepts(compiler, grammar("any"), text)
    assert segment(list(text)) == ("", "", [("Bash", ARGS, True)])


def test_harmony_vocabulary_ends_turns_on_call_and_return_not_end(compiler) -> None:
    tok, _ = compiler
    ids = {tok.backend.token_to_id(t): t for t in ("<|call|>", "<|return|>", "<|end|>")}
    assert {t for i, t in ids.items() if i in tok.eos_token_ids} == {"<|call|>", "<|return|>"}


# -- rendering through the real template -----------------------------------------------------

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
SOURCE = (real_templates_dir() / "openai-gpt-oss-120b.jinja").read_text()
KEY = b"k"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                            "days": {"type": "integer"}}, "required": ["city"]}
HF_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                              "parameters": WEATHER}}]


def request(messages: list[dict], **extra) -> MessageCreateParams:
    return MessageCreateParams.model_validate({
        "model": "gpt-oss", "max_tokens": 64, "system": "You are terse.", "messages": messages,
        "tools": [{"name": "get_weather", "description": "Weather for a city.", "input_schema": WEATHER}], **extra})


def transformers_render(messages: list[dict], **kwargs) -> str:
    rendered, _ = chat_template_utils.render_jinja_template(
        [copy.deepcopy(messages)], tools=copy.deepcopy(HF_TOOLS), chat_template=SOURCE, add_generation_prompt=True,
        **kwargs)
    return rendered[0]


def hf_call(call_id: str, city: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def use(call_id: str, city: str) -> dict:
    return {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": city}}


def result(call_id: str, text: str) -> dict:
    return {"type": "tool_result", "tool_use_id": call_id, "content": text}


def test_a_call_its_thinking_and_its_result_render_as_transformers_renders_them() -> None:
    signature = ThinkingSigner(KEY).sign("The tool knows.")
    ours = PromptRenderer(CharTokenizer(), SOURCE, thinking_key=KEY).render(request([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "The tool knows.", "signature": signature},
                                          use("toolu_1", "Paris")]},
        {"role": "user", "content": [result("toolu_1", "Sunny, 21°C")]},
    ], thinking={"type": "enabled", "budget_tokens": 8000}))
    expected = transformers_render([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "thinking": "The tool knows.", "tool_calls": [hf_call("toolu_1", "Paris")]},
        {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "Sunny, 21°C"},
    ], reasoning_effort="medium")
    assert ours.text == expected
    assert "<|channel|>analysis<|message|>The tool knows.<|end|>" in ours.text
    assert ours.text.endswith("<|start|>assistant") and ours.tools is not None and ours.tools.format == "harmony"


def test_parallel_calls_render_one_per_message_each_before_its_result() -> None:
    ours = PromptRenderer(CharTokenizer(), SOURCE, thinking_key=KEY).render(request([
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": [use("toolu_1", "Paris"), use("toolu_2", "Rome")]},
        {"role": "user", "content": [result("toolu_2", "Rainy"), result("toolu_1", "Sunny")]},
    ]))
    expected = transformers_render([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [hf_call("toolu_1", "Paris")]},
        {"role": "tool", "tool_call_id": "toolu_1", "name": "get_weather", "content": "Sunny"},
        {"role": "assistant", "content": "", "tool_calls": [hf_call("toolu_2", "Rome")]},
        {"role": "tool", "tool_call_id": "toolu_2", "name": "get_weather", "content": "Rainy"},
    ], reasoning_effort="low")  # no thinking asked for
    assert ours.text == expected
    assert ours.text.index('"Sunny"') < ours.text.index("functions.get_weather<|channel|>commentary json<|message|>"
                                                         '{"city": "Rome"}')


@pytest.mark.parametrize(("extra", "effort"), [
    ({}, "low"),  # no thinking asked for: the least reasoning
    ({"thinking": {"type": "adaptive"}}, "medium"),  # thinking, no effort: the template's default
    ({"thinking": {"type": "disabled"}}, "low"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
    ({"thinking": {"type": "enabled", "budget_tokens": 32000}}, "high"),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}, "high"),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "low"}}, "low"),
    ({"output_config": {"effort": "max"}}, "high"),
])
def test_reasoning_effort_reaches_the_template(extra: dict, effort: str) -> None:
    text = PromptRenderer(CharTokenizer(), SOURCE, thinking_key=KEY).render(
        request([{"role": "user", "content": "hi"}], **extra)).text
    assert f"Reasoning: {effort}\n" in text


def test_a_renderer_default_effort_yields_only_to_a_request_that_says() -> None:
    renderer = PromptRenderer(CharTokenizer(), SOURCE, thinking_key=KEY, template_kwargs={"reasoning_effort": "high"})
    plain = renderer.render(request([{"role": "user", "content": "hi"}])).text
    said = renderer.render(request([{"role": "user", "content": "hi"}], output_config={"effort": "low"})).text
    assert "Reasoning: high\n" in plain and "Reasoning: low\n" in said


def test_a_result_whose_call_is_gone_renders_as_user_text_not_a_refusal() -> None:
    prompt = PromptRenderer(CharTokenizer(), SOURCE, thinking_key=KEY).render(request([
        {"role": "user", "content": [result("toolu_9", "Sunny"), {"type": "text", "text": "So?"}]},
    ]))
    assert prompt.tools is not None and prompt.tools.native  # no fallback to the built-in prompt
    assert "<|start|>user<|message|>Sunny<|end|><|start|>user<|message|>So?<|end|>" in prompt.text
