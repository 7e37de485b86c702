"""Real trained weights (ASSETS.md): Qwen2.5-Coder-0.5B/1.5B-Instruct and Gemma-3-270M, Q4_K_M.

Per file: our logits against transformers' own GGUF loading — the float path (every tensor
dequantised, float32) within 2e-3 of the logit scale, the served path (GGUF codes on the CPU
kernels, activations quantised per block) within 5% of it and with the same top token at
almost every position — and a sensible greedy answer through the engine. The Qwen files are
then served and driven through the official SDK, tools included.
"""

from __future__ import annotations

import functools
from pathlib import Path

import anthropic
import pytest
import torch

from pensieve.backends.torch_backend import build_engine, build_model
from pensieve.engine.config import EngineConfig
from pensieve.engine.types import SamplingParams
from pensieve.loaders.registry import load_checkpoint
from pensieve.models.forward_context import ForwardContext, SequenceSlice
from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

TEXT = "The capital of France is Paris. The capital of Germany is Berlin. def add(a, b): return a + b"
MODELS = ("qwen_coder_05b_gguf", "qwen_coder_15b_gguf", "gemma3_270m_gguf")


def _ids(ckpt) -> list[int]:
    tok = ckpt.tokenizer
    ids = tok.encode(TEXT)
    return [tok.bos_token_id, *ids] if tok.add_bos and tok.bos_token_id is not None else ids


def _our_logits(model, args, ids: list[int]) -> torch.Tensor:
    """One prefill of ``ids`` over a paged cache, logits at every position."""
    n, block = len(ids), 16
    shape = (-(-n // block), block, args.num_kv_heads, args.head_dim)
    k = [torch.zeros(shape) for _ in range(args.num_layers)]
    v = [torch.zeros(shape) for _ in range(args.num_layers)]
    seq = SequenceSlice(0, n, n, torch.arange(shape[0]))
    ctx = ForwardContext(k, v, torch.arange(n), [seq], torch.arange(n))
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(n), ctx).float()


@functools.lru_cache(maxsize=1)
def _reference(path: Path, ids: tuple[int, ...]) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = ref(torch.tensor([list(ids)])).logits[0].float()
    del ref
    return logits


@pytest.mark.parametrize("fixture", MODELS)
def test_logits_match_transformers_gguf_loading(fixture, request):
    path: Path = request.getfixturevalue(fixture)
    floats = load_checkpoint(path)
    ids = _ids(floats)
    expected = _reference(path, tuple(ids))
    scale = expected.abs().max().item()

    ours = _our_logits(build_model(floats, EngineConfig(context_length=512)), floats.args, ids)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 2e-3 * scale

    codes = load_checkpoint(path, keep_int4=True)
    assert codes.int4, "the served path keeps the GGUF's 4-bit codes"
    served = build_engine(codes, EngineConfig(context_length=512, int8_lm_head=True))
    # the declared fast path is taken, not silently the module path: Qwen2 on the one-call
    # decoder; Gemma 3 (other norms, GELU) never on it
    assert (served.runner.cpu_decoder is not None) == (codes.args.architecture == "qwen2")
    quant = _our_logits(served.runner.model, codes.args, ids)
    error = (quant - expected).abs().max().item()
    agree = (quant.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"{path.name}: float max err {(ours - expected).abs().max().item():.2e}, "
          f"served max err {error:.3f} of scale {scale:.1f}, top-1 agreement {agree:.3f}")
    assert error <= 0.05 * scale
    assert agree >= 0.9


def _greedy(path: Path, prompt_ids: list[int], max_tokens: int = 24) -> str:
    ckpt = load_checkpoint(path, keep_int4=True)
    engine = build_engine(ckpt, EngineConfig(context_length=1024, int8_lm_head=True))
    engine.add_request("r", prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    text = []
    while engine.has_work():
        text.extend(d.text for d in engine.step())
    return "".join(text)


def test_gemma3_base_model_continues_sensibly(gemma3_270m_gguf):
    ckpt = load_checkpoint(gemma3_270m_gguf)
    tok = ckpt.tokenizer
    ids = [tok.bos_token_id, *tok.encode("The capital of France is Paris. The capital of Germany is")]
    assert "Berlin" in _greedy(gemma3_270m_gguf, ids, max_tokens=4)


READ_TOOL = {
    "name": "Read",
    "description": "Read a file from the local filesystem and return its contents.",
    "input_schema": {"type": "object", "properties": {
        "file_path": {"type": "string", "description": "Path of the file to read"}},
        "required": ["file_path"]},
}
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def qwen05_client(qwen_coder_05b_gguf):
    with pensieve_server("--model", str(qwen_coder_05b_gguf), "--context-length", "4096") as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)


@pytest.fixture(scope="module")
def qwen15_client(qwen_coder_15b_gguf):
    with pensieve_server("--model", str(qwen_coder_15b_gguf), "--context-length", "4096") as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)


def test_qwen05_writes_code_through_the_sdk(qwen05_client):
    msg = qwen05_client.messages.create(
        model="claude-sonnet-5", max_tokens=60, extra_body=GREEDY,
        messages=[{"role": "user", "content": "Write a Python function square(x) that returns "
                                              "x squared. Reply with code only."}])
    text = msg.content[0].text
    assert "def square" in text and ("x * x" in text or "x**2" in text or "x ** 2" in text), text
    assert msg.stop_reason == "end_turn"


@pytest.mark.parametrize("client_fixture", ["qwen05_client", "qwen15_client"])
def test_qwen_calls_a_tool_through_the_sdk(client_fixture, request):
    client = request.getfixturevalue(client_fixture)
    msg = client.messages.create(
        model="claude-sonnet-5", max_tokens=120, extra_body=GREEDY, tools=[READ_TOOL],
        messages=[{"role": "user", "content": "Read the file deploy/settings.toml and tell me "
                                              "its listen_port."}])
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and calls, msg.content
    assert calls[0].name == "Read" and "settings.toml" in calls[0].input["file_path"]


def test_qwen15_follow_up_turn_hits_the_cache_and_comes_back_structured(qwen15_client):
    """Turn two of a tool loop, streamed: its prefix (system, tools, turn one) is read from the
    cache, and what the model writes comes back as blocks, never as raw call JSON. (At greedy,
    given only a bare ``<tool_response>``, both small Qwen-Coders call Read again — as a bare
    ``{"name": …}`` object, which the Hermes parser reads as the call it is. Under Claude
    Code's own prompt the 1.5B answers: tests/e2e/test_claude_code_real_work.py.)"""
    first = [{"role": "user", "content": "Read deploy/settings.toml and tell me its listen_port."}]
    qwen15_client.messages.create(model="claude-sonnet-5", max_tokens=40, tools=[READ_TOOL],
                                  messages=first, extra_body=GREEDY)
    messages = [
        *first,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Read",
                                           "input": {"file_path": "deploy/settings.toml"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": "[server]\nhost = \"0.0.0.0\"\nlisten_port = 7341\n"}]},
    ]
    with qwen15_client.messages.stream(model="claude-sonnet-5", max_tokens=60, tools=[READ_TOOL],
                                       messages=messages, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens > 100, final.usage
    text = "".join(b.text for b in final.content if b.type == "text")
    calls = [b for b in final.content if b.type == "tool_use"]
    assert '"name"' not in text, final.content
    assert "7341" in text or (calls and calls[0].name == "Read"), final.content
    assert final.stop_reason == ("tool_use" if calls else "end_turn")


def test_forced_tool_choice_constrains_qwen(qwen15_client):
    msg = qwen15_client.messages.create(
        model="claude-sonnet-5", max_tokens=80, extra_body=GREEDY, tools=[READ_TOOL],
        tool_choice={"type": "tool", "name": "Read"},
        messages=[{"role": "user", "content": "What is in README.md?"}])
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert len(calls) == 1 and calls[0].name == "Read"
    assert isinstance(calls[0].input.get("file_path"), str)


@pytest.fixture(scope="module")
def gemma_client(gemma3_270m_gguf):
    with pensieve_server("--model", str(gemma3_270m_gguf), "--context-length", "2048") as url:
        yield anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)


def test_gemma3_served_through_the_sdk_with_a_forced_tool(gemma_client):
    """A base model with no chat template (ChatML and the built-in tool prompt stand in): the
    grammar over its 262k vocabulary still makes a forced call valid for the tool's schema."""
    msg = gemma_client.messages.create(
        model="claude-haiku-4-5", max_tokens=60, extra_body=GREEDY, tools=[READ_TOOL],
        tool_choice={"type": "tool", "name": "Read", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Open the file notes.txt"}])
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(calls) == 1, msg.content
    assert calls[0].name == "Read" and calls[0].input["file_path"] == "notes.txt"
    counted = gemma_client.messages.count_tokens(
        model="claude-haiku-4-5", tools=[READ_TOOL],
        tool_choice={"type": "tool", "name": "Read", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Open the file notes.txt"}])
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens \
        + msg.usage.cache_creation_input_tokens
