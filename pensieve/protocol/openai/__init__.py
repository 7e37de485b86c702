"""The OpenAI wire types (``/v1/chat/completions``, ``/v1/completions``), named as the ``openai``
SDK names them; no logic."""

from pensieve.protocol.openai.requests import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionCreateParams,
    ChatCompletionDeveloperMessageParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionSystemMessageParam,
    ChatCompletionToolMessageParam,
    ChatCompletionUserMessageParam,
    CompletionCreateParams,
    ContentParam,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SamplingFields,
)
from pensieve.protocol.openai.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatFinishReason,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    Choice,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionUsage,
    Function,
    OpenAIErrorObject,
    OpenAIErrorResponse,
    PromptTokensDetails,
)

__all__ = [
    "ChatCompletion", "ChatCompletionAssistantMessageParam", "ChatCompletionChunk",
    "ChatCompletionCreateParams", "ChatCompletionDeveloperMessageParam",
    "ChatCompletionFunctionToolParam", "ChatCompletionMessage",
    "ChatCompletionMessageFunctionToolCall", "ChatCompletionMessageParam",
    "ChatCompletionNamedToolChoiceParam", "ChatCompletionSystemMessageParam",
    "ChatCompletionToolMessageParam", "ChatCompletionUserMessageParam", "ChatFinishReason",
    "Choice", "ChoiceDelta", "ChoiceDeltaToolCall", "ChoiceDeltaToolCallFunction", "ChunkChoice",
    "Completion", "CompletionChoice", "CompletionCreateParams", "CompletionUsage", "ContentParam",
    "Function", "OpenAIErrorObject", "OpenAIErrorResponse", "PromptTokensDetails",
    "ResponseFormatJSONObject", "ResponseFormatJSONSchema", "SamplingFields",
]
