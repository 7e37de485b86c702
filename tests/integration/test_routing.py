"""Several models from one TOML config (``pensieve serve --config``): the default SmolLM2 as
``main`` and a tiny random Qwen2 (an HF folder this test builds) as ``small``; ``claude-haiku-*``
is routed to ``small`` (pulled into a model store and named by its store name),
``claude-sonnet-*``/``claude-opus-*`` to ``main``. Driven by the
anthropic and openai SDKs; which model answered is read from ``/metrics`` (tokens by model)
and ``/v1/status``. ``small`` loads on first use and unloads when idle."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pensieve.loaders.default_model import default_model_path
from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow

IDLE_UNLOAD_S = 3
UNLOAD_WAIT_S = 60


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    import transformers

    from tests.helpers.tiny_families import VOCAB, hf_model, save_hf

    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    return save_hf(tmp_path_factory.mktemp("small-qwen2"), hf_model(config))


@pytest.fixture(scope="module")
def base_url(small_model, tmp_path_factory):
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("home")  # the small model is served from a model store by name
    pulled = subprocess.run([sys.executable, "-m", "pensieve.cli.main", "pull", str(small_model),
                             "--name", "tiny-qwen", "--link", "symlink", "--store", str(home / "models")],
                            capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    config = tmp_path_factory.mktemp("cfg") / "models.toml"
    config.write_text(f'''
idle_unload_s = {IDLE_UNLOAD_S}

[[models]]
name = "main"
model = "{default_model_path()}"
aliases = ["smollm2"]
context_length = 2048

[[models]]
name = "small"
model = "tiny-qwen"
context_length = 512

[[models]]
name = "broken"
model = "{small_model}/does-not-exist.gguf"

[routes]
"claude-haiku-*" = "small"
"claude-sonnet-*" = "main"
"claude-opus-*" = "main"
"gpt-*" = "small"
''')
    with pensieve_server("--config", str(config), env={"PENSIEVE_HOME": str(home)}) as url:
        yield url


def output_tokens_by_model(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pensieve_generation_tokens_total":
                out[s.labels["model"]] = s.value
    return out


def loaded(url: str) -> dict[str, bool]:
    return {m["id"]: m["loaded"] for m in httpx.get(f"{url}/v1/status").json()["models"]}


def test_models_list_has_claude_ids_per_route_and_pages(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key="local", max_retries=0)
    ids = [m.id for m in client.models.list(limit=1000)]
    assert ids[:3] == ["claude-haiku-small", "claude-sonnet-main", "claude-opus-main"]
    assert {"main", "small", "broken"} <= set(ids) and "gpt-small" in ids
    raw = httpx.get(f"{base_url}/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in raw["data"]] == ids[:2] and raw["has_more"] is True
    assert raw["first_id"] == ids[0] and raw["last_id"] == ids[1]
    after = httpx.get(f"{base_url}/v1/models", params={"limit": 2, "after_id": ids[1]}).json()
    assert [m["id"] for m in after["data"]] == ids[2:4]
    before = httpx.get(f"{base_url}/v1/models", params={"limit": 2, "before_id": ids[3]}).json()
    assert [m["id"] for m in before["data"]] == ids[1:3] and before["has_more"] is True
    assert client.models.retrieve("claude-haiku-4-5-20251001").display_name == "small"
    assert client.models.retrieve("claude-opus-4-8").display_name == "main"


def test_haiku_goes_to_the_small_model_sonnet_to_main(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key="local", max_retries=0)
    assert loaded(base_url) == {"main": True, "small": False, "broken": False}  # small: on first use
    before = output_tokens_by_model(base_url)
    haiku = client.messages.create(model="claude-haiku-4-5-20251001", max_tokens=8,
                                   messages=[{"role": "user", "content": "hi"}], extra_body={"temperature": 0})
    assert haiku.model == "claude-haiku-4-5-20251001" and haiku.usage.output_tokens > 0
    mid = output_tokens_by_model(base_url)
    assert mid["small"] - before.get("small", 0) == haiku.usage.output_tokens
    assert mid.get("main", 0) == before.get("main", 0)
    assert loaded(base_url)["small"] is True
    sonnet = client.messages.create(model="claude-sonnet-5", max_tokens=12, extra_body={"temperature": 0},
                                    messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in sonnet.content[0].text
    after = output_tokens_by_model(base_url)
    assert after["main"] - mid.get("main", 0) == sonnet.usage.output_tokens
    assert after["small"] == mid["small"]
    by_alias = client.messages.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert output_tokens_by_model(base_url)["main"] - after["main"] == by_alias.usage.output_tokens


def test_openai_route_and_errors(base_url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="local", max_retries=0)
    before = output_tokens_by_model(base_url)
    reply = client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert output_tokens_by_model(base_url)["small"] - before.get("small", 0) == reply.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llama-70b", messages=[{"role": "user", "content": "hi"}])
    broken = httpx.post(f"{base_url}/v1/messages", json={"model": "broken", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert broken.status_code == 500
    err = broken.json()["error"]
    assert err["type"] == "api_error" and "broken could not be loaded" in err["message"]
    with pytest.raises(openai.InternalServerError) as failed:  # the OpenAI routes answer in OpenAI's shape
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert failed.value.body["type"] == "server_error" and "broken could not be loaded" in failed.value.body["message"]
    anth = anthropic.Anthropic(base_url=base_url, api_key="local", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as info:
        anth.messages.create(model="llama-70b", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert "main" in info.value.message and "small" in info.value.message
    # the server goes on serving after a model failed to load
    assert anth.messages.create(model="claude-haiku-4-5", max_tokens=4,
                                messages=[{"role": "user", "content": "hi"}]).usage.output_tokens > 0


def test_idle_model_unloads_and_loads_again(base_url):
    client = anthropic.Anthropic(base_url=base_url, api_key="local", max_retries=0)
    client.messages.create(model="claude-haiku-4-5", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert loaded(base_url)["small"] is True
    deadline = time.monotonic() + UNLOAD_WAIT_S
    while loaded(base_url)["small"] and time.monotonic() < deadline:
        time.sleep(0.5)
    state = loaded(base_url)
    assert state["small"] is False and state["main"] is True  # main is the first model: kept
    again = client.messages.create(model="claude-haiku-4-5", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert again.usage.output_tokens > 0 and loaded(base_url)["small"] is True


def test_pensieve_claude_sets_each_tier_from_the_routes(base_url, tmp_path):
    import os
    import subprocess
    import sys

    dump = tmp_path / "env.txt"
    fake = tmp_path / "claude"
    fake.write_text(f"#!/bin/sh\nenv > {dump}\n")
    fake.chmod(0o755)
    done = subprocess.run([sys.executable, "-m", "pensieve.cli.main", "claude", "--url", base_url,
                           "--claude-bin", str(fake), "--config-dir", str(tmp_path / "cc"), "-p", "hi"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == env["ANTHROPIC_SMALL_FAST_MODEL"] == "claude-haiku-small"
    assert env["ANTHROPIC_DEFAULT_SONNET_MODEL"] == env["ANTHROPIC_MODEL"] == "claude-sonnet-main"
    assert env["CLAUDE_CODE_SUBAGENT_MODEL"] == "claude-sonnet-main"
    assert env["ANTHROPIC_DEFAULT_OPUS_MODEL"] == "claude-opus-main"
    assert "haiku → claude-haiku-small" in done.stderr
