"""Messages ⇄ prompt tokens (chat templates) and engine deltas → Anthropic stream events."""

from pensieve.chat.prompt import PromptRenderer, PromptTokenizer, RenderedPrompt
from pensieve.chat.stream import (
    GenerationFailed,
    MessageEventBuilder,
    collect_message,
    message_events,
)
from pensieve.chat.template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "GenerationFailed",
    "MessageEventBuilder",
    "PromptRenderer",
    "PromptTokenizer",
    "RenderedPrompt",
    "collect_message",
    "message_events",
]
