"""Everything around generation: auth, models, count_tokens, error envelope, request ids."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from pensieve.api import ApiConfig
from tests.helpers.api_fakes import ScriptedEngine, fake_server, text_script

HI = [{"role": "user", "content": "hi"}]


def sdk(base_url: str, **kw: object) -> anthropic.Anthropic:
    kw.setdefault("api_key", "k1")
    return anthropic.Anthropic(base_url=base_url, max_retries=0, timeout=10, **kw)


def assert_envelope(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert response.headers["request-id"].startswith("req_")
    assert body["request_id"] == response.headers["request-id"]
    return str(body["error"]["message"])


@pytest.fixture(scope="module")
def url() -> str:
    engine = ScriptedEngine(text_script("ok"))
    with fake_server(engine, api_keys=("k1", "k2"), model_aliases={"smol": "tiny-model"},
                     max_body_bytes=4096) as base_url:
        yield base_url  # type: ignore[misc]


def test_either_auth_header_is_accepted(url: str) -> None:
    assert sdk(url, api_key="k1").messages.create(model="tiny-model", max_tokens=5, messages=HI).content
    bearer = anthropic.Anthropic(base_url=url, auth_token="k2", max_retries=0)
    assert bearer.messages.create(model="tiny-model", max_tokens=5, messages=HI).content


def test_missing_or_wrong_key_is_401(url: str) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        sdk(url, api_key="wrong").messages.create(model="tiny-model", max_tokens=5, messages=HI)
    response = httpx.post(f"{url}/v1/messages", json={"model": "m", "max_tokens": 1, "messages": HI})
    assert "API key" in assert_envelope(response, 401, "authentication_error")
    response = httpx.get(f"{url}/v1/models", headers={"authorization": "Basic k1"})
    assert_envelope(response, 401, "authentication_error")


def test_health_and_root_need_no_key(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.head(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200


def test_request_id_header_on_success_and_on_errors(url: str) -> None:
    raw = sdk(url).messages.with_raw_response.create(model="tiny-model", max_tokens=5, messages=HI)
    assert raw.headers["request-id"].startswith("req_")
    with pytest.raises(anthropic.NotFoundError) as info:
        sdk(url).messages.create(model="gpt-4o", max_tokens=5, messages=HI)
    assert info.value.request_id and info.value.request_id.startswith("req_")
    assert httpx.get(f"{url}/health").headers["request-id"].startswith("req_")


def test_model_names_the_server_answers_to(url: str) -> None:
    client = sdk(url)
    for name in ("tiny-model", "smol", "claude-haiku-4-5-20251001", "claude-opus-4-8"):
        assert client.messages.create(model=name, max_tokens=5, messages=HI).model == name
        assert client.models.retrieve(name).id == name
    with pytest.raises(anthropic.NotFoundError, match="gpt-4o"):
        client.messages.create(model="gpt-4o", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("some/other-model")
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="gpt-4o", messages=HI)


def test_models_list(url: str) -> None:
    page = sdk(url).models.list()
    assert [m.id for m in page.data] == ["tiny-model"]
    info = page.data[0]
    assert info.type == "model" and info.lifecycle == "active" and info.max_input_tokens == 4096
    assert not page.has_more


def test_only_configured_names_when_claude_names_are_off() -> None:
    with fake_server(ScriptedEngine(text_script("ok")), accept_any_claude_model=False) as url:
        with pytest.raises(anthropic.NotFoundError):
            sdk(url).messages.create(model="claude-sonnet-5", max_tokens=5, messages=HI)
        assert sdk(url).messages.create(model="tiny-model", max_tokens=5, messages=HI).content


def test_count_tokens_equals_message_start_input_tokens(url: str) -> None:
    client = sdk(url)
    system = [{"type": "text", "text": "Be kind."}]
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    count = client.beta.messages.count_tokens(model="claude-x", messages=HI, system=system,  # type: ignore[arg-type]
                                              tools=tools, betas=["token-counting-2024-11-01"])  # type: ignore[arg-type]
    with client.messages.stream(model="claude-x", max_tokens=5, messages=HI, system=system,  # type: ignore[arg-type]
                                tools=tools) as stream:  # type: ignore[arg-type]
        start = next(iter(stream))
    assert start.type == "message_start" and start.message.usage.input_tokens == count.input_tokens > 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b'{"model": "m", "max_tokens": "many", "messages": []}', "max_tokens: "),
        (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
         "messages.0.content.0.text: Field required"),
        (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}', "'bot'"),
        (b'[1, 2]', "Input should be"),
    ],
)
def test_bad_bodies_are_400_with_a_readable_message(url: str, content: bytes, expected: str) -> None:
    response = httpx.post(f"{url}/v1/messages", content=content,
                          headers={"x-api-key": "k1", "content-type": "application/json"})
    assert expected in assert_envelope(response, 400, "invalid_request_error")


def test_oversized_body_is_413(url: str) -> None:
    big = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(f"{url}/v1/messages", json=big, headers={"x-api-key": "k1"})
    assert_envelope(response, 413, "request_too_large")

    def chunks():  # no content-length: counted as it arrives
        yield b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    response = httpx.post(f"{url}/v1/messages", content=chunks(), headers={"x-api-key": "k1"})
    assert_envelope(response, 413, "request_too_large")
    with pytest.raises(anthropic.APIStatusError) as info:
        sdk(url).messages.create(model="tiny-model", max_tokens=5, messages=big["messages"])  # type: ignore[arg-type]
    assert info.value.status_code == 413


def test_unknown_route_and_method_get_the_envelope(url: str) -> None:
    assert_envelope(httpx.get(f"{url}/v1/nothing-here"), 404, "not_found_error")
    assert_envelope(httpx.get(f"{url}/v1/messages", headers={"x-api-key": "k1"}), 405, "invalid_request_error")


def test_unexpected_failure_is_a_bare_500_and_the_server_goes_on() -> None:
    engine = ScriptedEngine(text_script("ok"), start_error=RuntimeError("secret stack detail"))
    with fake_server(engine) as url:
        response = httpx.post(f"{url}/v1/messages", json={"model": "claude-x", "max_tokens": 5, "messages": HI})
        message = assert_envelope(response, 500, "api_error")
        assert "secret" not in response.text and "Traceback" not in response.text
        assert message == "Internal server error"
        engine.start_error = None
        assert sdk(url).messages.create(model="claude-x", max_tokens=5, messages=HI).content


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="context_length"):
        ApiConfig(model_id="m", context_length=0)
    with pytest.raises(ValueError, match="model_id"):
        ApiConfig(model_id="", context_length=10)
    with pytest.raises(ValueError, match="ping_interval_s"):
        ApiConfig(model_id="m", context_length=10, ping_interval_s=0)
    config = ApiConfig(model_id="m", context_length=10, model_aliases={"a": "m"}, api_keys=["k"])  # type: ignore[arg-type]
    assert config.resolve_model("a") == config.resolve_model("claude-x") == "m"
    assert config.resolve_model("other") is None and config.api_keys == ("k",)
