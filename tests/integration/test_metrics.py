"""``/metrics`` (Prometheus text, parsed by prometheus_client's own parser) and ``/v1/status``
on the real server with SmolLM2: the counters and histograms move after real requests made
with the anthropic and openai SDKs."""

from __future__ import annotations

import anthropic
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_url():
    with pensieve_server() as url:
        yield url


def scrape(base_url: str) -> dict[str, list]:
    """Every sample by name: ``name → [(labels, value), …]``."""
    res = httpx.get(f"{base_url}/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_counters_move_after_requests(base_url):
    model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["display_name"]
    before = scrape(base_url)
    client = anthropic.Anthropic(base_url=base_url, api_key="local", max_retries=0)
    first = client.messages.create(model="claude-sonnet-5", max_tokens=12, messages=QUESTION, extra_body=GREEDY)
    again = client.messages.create(model="claude-sonnet-5", max_tokens=12, messages=QUESTION, extra_body=GREEDY)
    assert again.usage.cache_read_input_tokens > 0
    with client.messages.stream(model="claude-sonnet-5", max_tokens=8, messages=QUESTION, extra_body=GREEDY) as s:
        streamed = s.get_final_message()
    bad = httpx.post(f"{base_url}/v1/messages", json={"model": "claude-sonnet-5"})
    assert bad.status_code == 400
    after = scrape(base_url)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("pensieve_requests_total", route="/v1/messages", status="200", model=model) == 3
    assert moved("pensieve_requests_total", route="/v1/messages", status="400") == 1
    outputs = first.usage.output_tokens + again.usage.output_tokens + streamed.usage.output_tokens
    assert moved("pensieve_generation_tokens_total", model=model) == outputs
    prompts = sum(m.usage.input_tokens + m.usage.cache_read_input_tokens + m.usage.cache_creation_input_tokens
                  for m in (first, again, streamed))
    assert moved("pensieve_prompt_tokens_total", model=model) == prompts
    assert moved("pensieve_cached_prompt_tokens_total", model=model) >= again.usage.cache_read_input_tokens
    for hist in ("pensieve_time_to_first_token_seconds", "pensieve_e2e_request_latency_seconds",
                 "pensieve_time_per_output_token_seconds"):
        assert moved(f"{hist}_count", model=model) == 3, hist
        assert moved(f"{hist}_sum", model=model) > 0, hist
    assert 0 < total(after, "pensieve_prefix_cache_hit_rate", model=model) < 1
    free = total(after, "pensieve_kv_blocks_free", model=model)
    used = total(after, "pensieve_kv_blocks_used", model=model)
    assert free > 0 and used == 0  # every request has ended: nothing holds a block
    assert total(after, "pensieve_kv_blocks_cached", model=model) > 0
    for gauge in ("pensieve_requests_running", "pensieve_requests_waiting", "pensieve_queue_depth"):
        assert [v for _, v in after[gauge]] == [0.0], gauge


def test_openai_routes_are_counted_and_status_reports(base_url):
    openai = pytest.importorskip("openai")
    before = scrape(base_url)
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="local", max_retries=0)
    reply = client.chat.completions.create(model="claude-sonnet-5", max_tokens=6, temperature=0,
                                           messages=QUESTION)
    after = scrape(base_url)
    moved = (total(after, "pensieve_requests_total", route="/v1/chat/completions", status="200")
             - total(before, "pensieve_requests_total", route="/v1/chat/completions", status="200"))
    assert moved == 1
    status = httpx.get(f"{base_url}/v1/status").json()
    assert status["models"][0]["loaded"] is True and status["models"][0]["context_length"] > 0
    assert status["running"] == [] and status["uptime_s"] >= 0
    assert 0 < status["cache_hit_rate"] < 1
    assert sum(p["tokens_per_s"] for p in status["throughput"]) * status["throughput_bucket_s"] >= \
        reply.usage.completion_tokens
    engine = next(iter(status["engines"].values()))
    assert engine["kv_blocks_total"] >= engine["kv_blocks_free"] > 0
