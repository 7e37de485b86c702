"""The MLX backend through the real server: the default SmolLM2 converted to MLX (float32, no
quantisation; once per machine, cached), `pensieve serve --backend mlx`, the official anthropic
SDK as the client — answers, streams, token counts, a forced tool call, prefix reuse on a
follow-up turn, a client that disconnects mid-stream — and the same greedy tokens as the torch
backend on the same weights in the same dtype. Skipped only where mlx cannot be imported."""

from __future__ import annotations

import concurrent.futures

import anthropic
import jsonschema
import pytest
import torch

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'pensieve[mlx]')")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install 'pensieve[mlx]')")

from tests.helpers.mlx_models import default_mlx  # noqa: E402
from tests.helpers.real_server import pensieve_server  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "claude-sonnet-5"
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
SYSTEM = ("You are a helpful assistant for a travel agency. You answer questions about cities, "
          "their weather, museums, food and transport briefly and precisely, in English.")


@pytest.fixture(scope="module")
def mlx_folder():
    return default_mlx("float32")


@pytest.fixture(scope="module")
def sdk(mlx_folder):
    with pensieve_server("--backend", "mlx", "--model", str(mlx_folder), "--context-length",
                         "2048", "--max-num-seqs", "4", "--served-name", "smol-mlx") as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0, timeout=600)


def ask(sdk, content, max_tokens: int = 8, **kw):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return sdk.messages.create(model=MODEL, max_tokens=max_tokens, messages=messages,
                               extra_body=GREEDY, **kw)


def test_answers_and_counts_tokens(sdk):
    msg = ask(sdk, "What is the capital of France?", max_tokens=12)
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert "Paris" in text, text
    assert 0 < msg.usage.output_tokens <= 12
    counted = sdk.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}])
    prompt = msg.usage.input_tokens + msg.usage.cache_read_input_tokens + (
        msg.usage.cache_creation_input_tokens or 0)
    assert counted.input_tokens == prompt > 5


def test_streams_the_same_answer(sdk):
    plain = ask(sdk, "Name a fruit that is yellow.", max_tokens=6)
    with sdk.messages.stream(model=MODEL, max_tokens=6, extra_body=GREEDY, messages=[
            {"role": "user", "content": "Name a fruit that is yellow."}]) as stream:
        deltas = [e.delta.text for e in stream
                  if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        final = stream.get_final_message()
    assert len(deltas) >= 2 and "".join(deltas) == final.content[0].text
    assert final.content[0].text == plain.content[0].text
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_forced_tool_call_is_schema_valid(sdk):
    msg = ask(sdk, "What is the weather like in Paris?", max_tokens=48, tools=[WEATHER],
              tool_choice={"type": "tool", "name": "get_weather",
                           "disable_parallel_tool_use": True})
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(uses) == 1, msg.content
    assert uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])


def test_follow_up_turn_reads_its_prefix_from_cache(sdk):
    first_turn = [{"role": "user", "content": "Which city is the capital of Italy?"}]
    first = ask(sdk, first_turn, max_tokens=6, system=SYSTEM)
    follow = first_turn + [{"role": "assistant", "content": first.content[0].text},
                           {"role": "user", "content": "And of Spain?"}]
    second = ask(sdk, follow, max_tokens=6, system=SYSTEM)
    assert second.usage.cache_read_input_tokens >= 32, second.usage
    assert second.content[0].text.strip()


def test_concurrent_requests_are_batched_and_answer_as_alone(sdk):
    questions = ["What is 2 + 2?", "Name a color.", "Say hello."]
    alone = [ask(sdk, q, max_tokens=5).content[0].text for q in questions]
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = [m.content[0].text for m in pool.map(lambda q: ask(sdk, q, max_tokens=5),
                                                        questions)]
    assert together == alone


def test_a_disconnected_stream_does_not_hurt_the_next_request(sdk):
    with sdk.messages.stream(model=MODEL, max_tokens=200, extra_body=GREEDY, messages=[
            {"role": "user", "content": "Write a long story about a dragon."}]) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break  # the client goes away after the first token
    msg = ask(sdk, "What is the capital of France?", max_tokens=12)
    assert "Paris" in msg.content[0].text


def test_greedy_tokens_match_the_torch_backend(mlx_folder):
    """The same GGUF weights, float32 on both sides (MLX folder converted with --q-bits 0
    --dtype float32; torch dequantising the GGUF to float32), float32 KV: identical tokens."""
    from pensieve.backends.mlx_backend import load_mlx_model, mlx_engine
    from pensieve.backends.torch_backend import build_engine
    from pensieve.engine.config import EngineConfig
    from pensieve.engine.types import SamplingParams
    from pensieve.loaders.default_model import default_model_path
    from pensieve.loaders.registry import load_checkpoint

    def greedy(engine, prompts):
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=16, temperature=0.0,
                                                         ignore_eos=True))
        out = {str(i): [] for i in range(len(prompts))}
        while engine.has_work():
            for delta in engine.step():
                out[delta.request_id].extend(delta.token_ids)
        return [out[str(i)] for i in range(len(prompts))]

    loaded = load_mlx_model(mlx_folder)
    texts = ["The capital of France is", "def fibonacci(n):\n    ",
             "Once upon a time, in a small village by the sea, there lived"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    config = EngineConfig(context_length=512, block_size=16, max_num_seqs=4,
                          max_num_batched_tokens=64, dtype=torch.float32, kv_dtype=torch.float32)
    on_mlx = greedy(mlx_engine(loaded, config), prompts)
    on_torch = greedy(build_engine(load_checkpoint(default_model_path()), config), prompts)
    assert on_mlx == on_torch
    assert "Paris" in loaded.tokenizer.decode(on_mlx[0])
