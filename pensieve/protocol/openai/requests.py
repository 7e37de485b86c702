"""Request bodies of ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Named as the ``openai`` SDK names them. As on the Anthropic side, unknown fields are kept and
ignored (``frequency_penalty``, ``user``, ``metadata``, ``store`` …); what we cannot honour and
a client relies on (``n`` > 1, ``logprobs``, ``echo``, ``suffix``) is refused by the route with a
clear 400. ``temperature`` is in [0, 2] and ``top_p`` in [0, 1], as the API's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from pensieve.protocol.base import UNKNOWN_TAG, RequestModel, tag_of
from pensieve.protocol.requests import MAX_TOKENS_LIMIT


class ChatCompletionContentPartTextParam(RequestModel):
    type: Literal["text"]
    text: str


class UnknownContentPartParam(RequestModel):
    """``image_url``, ``input_audio``, ``file``, ``refusal`` or newer: kept, not rendered."""

    type: str


ChatCompletionContentPartParam = Annotated[
    Union[Annotated[ChatCompletionContentPartTextParam, Tag("text")],
          Annotated[UnknownContentPartParam, Tag(UNKNOWN_TAG)]],
    Discriminator(tag_of(["text"])),
]
ContentParam = Union[str, list[ChatCompletionContentPartParam]]


class ChatCompletionSystemMessageParam(RequestModel):
    role: Literal["system"]
    content: ContentParam
    name: str | None = None


class ChatCompletionDeveloperMessageParam(RequestModel):
    role: Literal["developer"]
    content: ContentParam
    name: str | None = None


class ChatCompletionUserMessageParam(RequestModel):
    role: Literal["user"]
    content: ContentParam
    name: str | None = None


class FunctionCall(RequestModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ChatCompletionMessageFunctionToolCallParam(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionAssistantMessageParam(RequestModel):
    role: Literal["assistant"]
    content: ContentParam | None = None
    tool_calls: list[ChatCompletionMessageFunctionToolCallParam] | None = None
    reasoning_content: str | None = None  # vLLM's and DeepSeek's field for the thinking text
    name: str | None = None


class ChatCompletionToolMessageParam(RequestModel):
    role: Literal["tool"]
    content: ContentParam
    tool_call_id: str


ChatCompletionMessageParam = Annotated[
    Union[ChatCompletionSystemMessageParam, ChatCompletionDeveloperMessageParam,
          ChatCompletionUserMessageParam, ChatCompletionAssistantMessageParam,
          ChatCompletionToolMessageParam],
    Field(discriminator="role"),
]


class FunctionDefinition(RequestModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionFunctionToolParam(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class UnknownToolParam(RequestModel):
    """A ``custom`` tool or anything newer: kept, not offered to the model."""

    type: str


ChatCompletionToolUnionParam = Annotated[
    Union[Annotated[ChatCompletionFunctionToolParam, Tag("function")],
          Annotated[UnknownToolParam, Tag(UNKNOWN_TAG)]],
    Discriminator(tag_of(["function"])),
]


class FunctionName(RequestModel):
    name: str


class ChatCompletionNamedToolChoiceParam(RequestModel):
    type: Literal["function"]
    function: FunctionName


ChatCompletionToolChoiceOptionParam = Union[
    Literal["none", "auto", "required"], ChatCompletionNamedToolChoiceParam]


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJSONObject(RequestModel):
    type: Literal["json_object"]


class JSONSchema(RequestModel):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[
    Union[ResponseFormatText, ResponseFormatJSONObject, ResponseFormatJSONSchema],
    Field(discriminator="type"),
]


class ChatCompletionStreamOptionsParam(RequestModel):
    include_usage: bool | None = None


class SamplingFields(RequestModel):
    """What both endpoints share: sampling, stopping, streaming."""

    model: str
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, strict=True)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, strict=True)
    stream: bool | None = Field(default=None, strict=True)
    stream_options: ChatCompletionStreamOptionsParam | None = None


class ChatCompletionCreateParams(SamplingFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT, strict=True)
    tools: list[ChatCompletionToolUnionParam] | None = None
    tool_choice: ChatCompletionToolChoiceOptionParam | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_k: int | None = Field(default=None, ge=0, strict=True)  # vLLM's extension


class CompletionCreateParams(SamplingFields):
    """Body of ``POST /v1/completions``: a prompt string or token ids, no chat template.
    (The API's default ``max_tokens`` is 16.)"""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    top_k: int | None = Field(default=None, ge=0, strict=True)
