"""What the OpenAI routes return: ``ChatCompletion``, its stream ``ChatCompletionChunk``,
``Completion``, ``CompletionUsage`` and the error envelope ``{"error": {message, type, param,
code}}`` — named as the ``openai`` SDK names them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from pensieve.protocol.base import ResponseModel

ChatFinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class CompletionUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Function(ResponseModel):
    name: str
    arguments: str


class ChatCompletionMessageFunctionToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: Function


class ChatCompletionMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChatCompletionMessageFunctionToolCall] | None = None
    reasoning_content: str | None = None


class Choice(ResponseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: ChatFinishReason
    logprobs: None = None


class ChatCompletion(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class _Sparse(BaseModel):
    """Stream deltas carry only the fields they set (``exclude_none`` when serialised)."""

    model_config = ConfigDict(extra="forbid")


class ChoiceDeltaToolCallFunction(_Sparse):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(_Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(ResponseModel):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: ChatFinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(ResponseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length", "content_filter"] | None
    logprobs: None = None


class Completion(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class OpenAIErrorObject(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(ResponseModel):
    error: OpenAIErrorObject
