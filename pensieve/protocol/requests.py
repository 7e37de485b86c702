"""Request bodies of ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

Only what we act on is declared; everything else a client sends (``context_management``,
``container``, ``service_tier``, ``inference_geo``, ``diagnostics``, ``speed`` …) is kept in
``model_extra`` and ignored (logged at debug). Limits follow the API: ``temperature`` and ``top_p`` in
[0, 1], ``top_k`` ≥ 0, ``max_tokens`` in [0, 2³¹ − 1] (0 only warms the cache: nothing is
generated).
Types are strict where the API's are: ``"max_tokens": "1"``, ``"stream": "yes"`` are refused
(400), not coerced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from pensieve.protocol.base import UNKNOWN_TAG, RequestModel, tag_of
from pensieve.protocol.content import CacheControlEphemeralParam, ContentBlockParam, MessageContentParam

# No model writes more; beyond it a value is a mistake, refused (400) rather than run to the end
# of the context. (Values up to it above the context are clamped: Claude Code sends 32k–64k.)
MAX_TOKENS_LIMIT = 2**31 - 1


class UserMessageParam(RequestModel):
    role: Literal["user"]
    content: MessageContentParam


class AssistantMessageParam(RequestModel):
    role: Literal["assistant"]
    content: MessageContentParam


class SystemMessageParam(RequestModel):
    """A ``system`` entry inside ``messages`` (the mid-conversation-system beta).

    ``clear_at: "next_user_message"``: shown only until a later user message exists.
    Its content may hold ``tool_addition``/``tool_removal`` directives (kept as unknown blocks).
    ``output_config.effort``: this turn's effort (the latest one overrides the top level).
    """

    role: Literal["system"]
    content: MessageContentParam
    clear_at: str | None = None
    output_config: dict[str, Any] | None = None


MessageParam = Annotated[
    Union[UserMessageParam, AssistantMessageParam, SystemMessageParam],
    Field(discriminator="role"),
]


class ToolParam(RequestModel):
    """A client tool: the model may answer with a ``tool_use`` block calling it."""

    name: str
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    strict: bool | None = None  # arguments are grammar-constrained whether or not it is set
    defer_loading: bool | None = None  # offered only once a tool_reference names it
    input_examples: list[Any] | None = None  # not rendered: templates have no place for them
    eager_input_streaming: bool | None = None  # arguments always stream as they are generated
    allowed_callers: list[str] | None = None  # only "direct" calls exist here
    cache_control: CacheControlEphemeralParam | None = None


class UnknownToolParam(RequestModel):
    """A server tool (``web_search_…``, ``bash_…``) or anything newer; kept, not offered."""

    type: str
    name: str | None = None


ToolUnionParam = Annotated[
    Union[Annotated[ToolParam, Tag("custom")], Annotated[UnknownToolParam, Tag(UNKNOWN_TAG)]],
    Discriminator(tag_of(["custom"], default="custom")),
]


class ToolChoiceAutoParam(RequestModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAnyParam(RequestModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceToolParam(RequestModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNoneParam(RequestModel):
    type: Literal["none"]


class UnknownTypedParam(RequestModel):
    """A ``tool_choice`` or ``thinking`` variant newer than us; ignored."""

    type: str


ToolChoiceParam = Annotated[
    Union[
        Annotated[ToolChoiceAutoParam, Tag("auto")],
        Annotated[ToolChoiceAnyParam, Tag("any")],
        Annotated[ToolChoiceToolParam, Tag("tool")],
        Annotated[ToolChoiceNoneParam, Tag("none")],
        Annotated[UnknownTypedParam, Tag(UNKNOWN_TAG)],
    ],
    Discriminator(tag_of(["auto", "any", "tool", "none"])),
]


class ThinkingConfigEnabledParam(RequestModel):
    type: Literal["enabled"]
    budget_tokens: int = Field(strict=True)
    display: str | None = None


class ThinkingConfigDisabledParam(RequestModel):
    type: Literal["disabled"]


class ThinkingConfigAdaptiveParam(RequestModel):
    type: Literal["adaptive"]
    display: str | None = None


class ThinkingConfigBetweenToolsParam(RequestModel):
    type: Literal["between_tools"]


ThinkingConfigParam = Annotated[
    Union[
        Annotated[ThinkingConfigEnabledParam, Tag("enabled")],
        Annotated[ThinkingConfigDisabledParam, Tag("disabled")],
        Annotated[ThinkingConfigAdaptiveParam, Tag("adaptive")],
        Annotated[ThinkingConfigBetweenToolsParam, Tag("between_tools")],
        Annotated[UnknownTypedParam, Tag(UNKNOWN_TAG)],
    ],
    Discriminator(tag_of(["enabled", "disabled", "adaptive", "between_tools"])),
]


class JSONOutputFormatParam(RequestModel):
    """Structured outputs: the answer is JSON that validates against ``schema``."""

    type: str  # "json_schema" (another type is ignored)
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")


class OutputConfigParam(RequestModel):
    effort: str | None = None  # low | medium | high | xhigh | max (newer values accepted)
    format: JSONOutputFormatParam | None = None


class MetadataParam(RequestModel):
    user_id: str | None = None


class ConversationParams(RequestModel):
    """What both endpoints share: the conversation that becomes the prompt."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[ContentBlockParam] | None = None
    tools: list[ToolUnionParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingConfigParam | None = None
    output_config: OutputConfigParam | None = None
    cache_control: CacheControlEphemeralParam | None = None  # automatic caching (top level)


class MessageCreateParams(ConversationParams):
    """Body of ``POST /v1/messages``."""

    max_tokens: int = Field(ge=0, le=MAX_TOKENS_LIMIT, strict=True)
    stream: bool | None = Field(default=None, strict=True)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)
    top_k: int | None = Field(default=None, ge=0, strict=True)
    metadata: MetadataParam | None = None


class MessageCountTokensParams(ConversationParams):
    """Body of ``POST /v1/messages/count_tokens``."""
