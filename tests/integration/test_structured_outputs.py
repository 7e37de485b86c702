"""Structured outputs (``output_config.format``) and strict tools on the real SmolLM2, through
the anthropic SDK: the answer parses and validates against the schema, streamed and not.

The bar: 20 varied schemas (nested objects, arrays with bounds, enums, const, required and
optional keys, numbers with bounds, string patterns, anyOf, nullable types, $defs/$ref) give
schema-valid JSON on every run, greedy and bounded by max_tokens. Keywords xgrammar accepts
but does not enforce (``uniqueItems``, ``not``, ``multipleOf``) still give JSON that parses.
"""

from __future__ import annotations

import concurrent.futures
import json

import anthropic
import httpx
import jsonschema
import pydantic
import pytest

from tests.helpers.real_server import pensieve_server

pytestmark = pytest.mark.slow
MODEL = "claude-sonnet-5"
GREEDY = {"temperature": 0}
MAX_TOKENS = 200


def obj(properties: dict, required: list[str] | None = None, **extra: object) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}


SCHEMAS: list[tuple[str, dict]] = [
    ("a person", obj({"name": {"type": "string"}, "age": {"type": "integer"}})),
    ("a color", obj({"color": {"type": "string", "enum": ["red", "green", "blue"]}})),
    ("a list of fruits", obj({"fruits": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5}})),
    ("a person with an address", obj({"person": obj({"name": {"type": "string"}, "address": obj(
        {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})})),
    ("a temperature reading", obj({"celsius": {"type": "number", "minimum": -50, "maximum": 60}})),
    ("a rating", obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                      "comment": {"type": "string", "maxLength": 80}}, ["stars"])),
    ("a number and whether it is prime", obj({"is_prime": {"type": "boolean"}, "number": {"type": "integer"}})),
    ("a name and an optional nickname", obj({"name": {"type": "string"}, "nickname": {"type": "string"}}, ["name"])),
    ("a contact by email or phone", obj({"contact": {"anyOf": [obj({"email": {"type": "string"}}),
                                                                obj({"phone": {"type": "string"}})]}})),
    ("a list of tasks", obj({"tasks": {"type": "array", "maxItems": 3,
                                       "items": obj({"title": {"type": "string"}, "done": {"type": "boolean"}})}})),
    ("an ISO date", obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}})),
    ("a sentiment", obj({"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("a point", obj({"x": {"type": "integer", "minimum": -10, "maximum": 10},
                     "y": {"type": "integer", "minimum": -10, "maximum": 10}})),
    ("a product", obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                       "price": {"type": "number", "exclusiveMinimum": 0},
                       "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["new", "sale", "used"]}}},
                      ["sku", "price"])),
    ("a first and a nullable middle name", obj({"first": {"type": "string"}, "middle": {"type": ["string", "null"]}})),
    ("a tree node with children", obj({"value": {"type": "integer"},
                                       "children": {"type": "array", "maxItems": 3, "items": obj({"value": {"type": "integer"}})}})),
    ("a versioned status", obj({"version": {"const": "v1"}, "ok": {"type": "boolean"}})),
    ("a 2x2 matrix", obj({"rows": {"type": "array", "minItems": 2, "maxItems": 2,
                                   "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}})),
    ("a shape", obj({"shape": {"anyOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}),
                                         obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0}})]}})),
    ("a user and a role", {**obj({"username": {"type": "string", "minLength": 1, "maxLength": 20},
                                  "role": {"$ref": "#/$defs/role"}}), "$defs": {"role": {"enum": ["admin", "user"]}}}),
]
# Accepted by xgrammar but not enforced by it: the answer must still parse.
UNENFORCED: list[tuple[str, dict]] = [
    ("three different numbers", obj({"numbers": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True,
                                                 "maxItems": 3}})),
    ("a multiple of three", obj({"n": {"type": "integer", "multipleOf": 3}})),
    ("anything but a string", obj({"value": {"not": {"type": "string"}}})),
]


@pytest.fixture(scope="module")
def server():
    with pensieve_server("--context-length", "2048", "--max-num-seqs", "24") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server, api_key="local", max_retries=0, timeout=900)


def ask(client, what: str, schema: dict, **kw):
    return client.messages.create(
        model=MODEL, max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": f"Give me {what} as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY, **kw)


def answer_text(message) -> str:
    assert [b.type for b in message.content] == ["text"], message.content
    return message.content[0].text


def test_twenty_varied_schemas_give_schema_valid_json_every_time(client):
    assert len(SCHEMAS) == 20
    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one engine batch
        messages = list(pool.map(lambda item: ask(client, *item), SCHEMAS))
    for (what, schema), message in zip(SCHEMAS, messages):
        value = json.loads(answer_text(message))
        jsonschema.validate(value, schema)
        assert message.stop_reason == "end_turn", (what, message.stop_reason)  # finished, not cut


def test_keywords_the_grammar_cannot_enforce_still_give_json(client):
    with concurrent.futures.ThreadPoolExecutor(len(UNENFORCED)) as pool:
        messages = list(pool.map(lambda item: ask(client, *item), UNENFORCED))
    for (what, schema), message in zip(UNENFORCED, messages):
        value = json.loads(answer_text(message))
        assert isinstance(value, dict) and set(value) == set(schema["properties"]), (what, value)


def test_streamed_answer_is_schema_valid_and_matches_the_accumulated_message(client):
    what, schema = SCHEMAS[3]
    with client.messages.stream(model=MODEL, max_tokens=MAX_TOKENS, extra_body=GREEDY,
                                messages=[{"role": "user", "content": f"Give me {what} as JSON."}],
                                output_config={"format": {"type": "json_schema", "schema": schema}}) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    jsonschema.validate(json.loads(streamed), schema)
    assert answer_text(final) == streamed and final.stop_reason == "end_turn"


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


def test_sdk_messages_parse_returns_the_typed_object(client):
    parsed = client.messages.parse(model=MODEL, max_tokens=MAX_TOKENS, output_format=City, extra_body=GREEDY,
                                   messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = parsed.parsed_output
    assert isinstance(city, City) and city.name


def test_count_tokens_counts_the_format_instruction(client):
    what, schema = SCHEMAS[0]
    messages = [{"role": "user", "content": f"Give me {what} as JSON."}]
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    counted = client.messages.count_tokens(model=MODEL, messages=messages, output_config=fmt).input_tokens
    plain = client.messages.count_tokens(model=MODEL, messages=messages).input_tokens
    message = ask(client, what, schema)
    usage = message.usage
    assert counted == usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert counted > plain


WEATHER = {"name": "get_weather", "description": "Get the current weather in a city.", "strict": True,
           "input_schema": obj({"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}})}


def test_with_auto_tools_the_answer_is_a_valid_call_or_valid_json(client):
    schema = obj({"summary": {"type": "string", "maxLength": 60}})
    prompts = ["Call get_weather for Paris.", "Summarise: the cat sat on the mat."]
    for prompt in prompts:
        message = client.messages.create(
            model=MODEL, max_tokens=MAX_TOKENS, tools=[WEATHER], tool_choice={"type": "auto"}, extra_body=GREEDY,
            messages=[{"role": "user", "content": prompt}],
            output_config={"format": {"type": "json_schema", "schema": schema}})
        calls = [b for b in message.content if b.type == "tool_use"]
        if calls:
            assert message.stop_reason == "tool_use"
            for call in calls:
                jsonschema.validate(call.input, WEATHER["input_schema"])
        else:
            jsonschema.validate(json.loads(answer_text(message)), schema)


def test_a_strict_tool_called_under_auto_has_schema_valid_input(client):
    message = client.messages.create(
        model=MODEL, max_tokens=MAX_TOKENS, tools=[WEATHER], extra_body=GREEDY,
        messages=[{"role": "user", "content": "Call get_weather for Paris."}])
    calls = [b for b in message.content if b.type == "tool_use"]
    assert calls and message.stop_reason == "tool_use", message.content  # the model opens a call here
    for call in calls:
        jsonschema.validate(call.input, WEATHER["input_schema"])


def test_malformed_and_unknown_formats(server, client):
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    bad = httpx.post(f"{server}/v1/messages", json={**body, "output_config": {"format": {"type": "json_schema"}}},
                     timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "schema" in bad.json()["error"]["message"]
    other = httpx.post(f"{server}/v1/messages", json={**body, "output_config": {"format": {"type": "yaml_2030"}}},
                       timeout=120)
    assert other.status_code == 200 and other.json()["content"][0]["type"] == "text"
