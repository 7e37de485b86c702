"""Anthropic Messages API wire types, named as the ``anthropic`` SDK names them. No logic."""

from pensieve.protocol.content import (
    CacheControlEphemeralParam,
    ContentBlockParam,
    DocumentBlockParam,
    ImageBlockParam,
    MessageContentParam,
    RedactedThinkingBlockParam,
    TextBlockParam,
    ThinkingBlockParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
    UnknownBlockParam,
)
from pensieve.protocol.errors import ErrorObject, ErrorResponse, ErrorType
from pensieve.protocol.events import (
    ErrorEvent,
    InputJSONDelta,
    MessageDelta,
    PingEvent,
    RawContentBlockDelta,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    RawMessageStreamEvent,
    SignatureDelta,
    StreamEvent,
    TextDelta,
    ThinkingDelta,
)
from pensieve.protocol.models import ModelInfo, ModelListResponse
from pensieve.protocol.requests import (
    AssistantMessageParam,
    ConversationParams,
    MessageCountTokensParams,
    MessageCreateParams,
    MessageParam,
    MetadataParam,
    OutputConfigParam,
    SystemMessageParam,
    ThinkingConfigAdaptiveParam,
    ThinkingConfigBetweenToolsParam,
    ThinkingConfigDisabledParam,
    ThinkingConfigEnabledParam,
    ThinkingConfigParam,
    ToolChoiceAnyParam,
    ToolChoiceAutoParam,
    ToolChoiceNoneParam,
    ToolChoiceParam,
    ToolChoiceToolParam,
    ToolParam,
    ToolUnionParam,
    UnknownToolParam,
    UnknownTypedParam,
    UserMessageParam,
)
from pensieve.protocol.responses import (
    ContentBlock,
    Message,
    MessageDeltaUsage,
    MessageTokensCount,
    RedactedThinkingBlock,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    Usage,
)

__all__ = [name for name in dir() if not name.startswith("_") and name[0].isupper()]
