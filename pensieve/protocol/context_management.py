"""Context management (the ``context-management`` beta): the request's ``context_management``
edits and what the response reports, named as the anthropic SDK's ``types.beta`` names them.

The edit params are strict where the API is (a bad ``keep`` is a 400); an edit type this
server does not know is kept as ``UnknownContextEditParam`` and ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag

from pensieve.protocol.base import UNKNOWN_TAG, RequestModel, ResponseModel, tag_of


class BetaInputTokensTriggerParam(RequestModel):
    type: Literal["input_tokens"]
    value: int = Field(ge=0, strict=True)


class BetaToolUsesTriggerParam(RequestModel):
    type: Literal["tool_uses"]
    value: int = Field(ge=0, strict=True)


class BetaToolUsesKeepParam(RequestModel):
    type: Literal["tool_uses"]
    value: int = Field(ge=0, strict=True)


class BetaInputTokensClearAtLeastParam(RequestModel):
    type: Literal["input_tokens"]
    value: int = Field(ge=0, strict=True)


class BetaThinkingTurnsParam(RequestModel):
    type: Literal["thinking_turns"]
    value: int = Field(ge=0, strict=True)


class BetaAllThinkingTurnsParam(RequestModel):
    type: Literal["all"]


Trigger = Annotated[Union[BetaInputTokensTriggerParam, BetaToolUsesTriggerParam], Field(discriminator="type")]
DEFAULT_TOOL_USES_TRIGGER_TOKENS = 100_000
DEFAULT_KEEP_TOOL_USES = 3
DEFAULT_COMPACTION_TRIGGER_TOKENS = 150_000


class BetaClearToolUses20250919EditParam(RequestModel):
    type: Literal["clear_tool_uses_20250919"]
    trigger: Trigger = Field(default_factory=lambda: BetaInputTokensTriggerParam(
        type="input_tokens", value=DEFAULT_TOOL_USES_TRIGGER_TOKENS))
    keep: BetaToolUsesKeepParam = Field(default_factory=lambda: BetaToolUsesKeepParam(
        type="tool_uses", value=DEFAULT_KEEP_TOOL_USES))
    clear_at_least: BetaInputTokensClearAtLeastParam | None = None
    exclude_tools: list[str] | None = None
    clear_tool_inputs: bool | list[str] | None = None


ThinkingKeep = Annotated[Union[BetaThinkingTurnsParam, BetaAllThinkingTurnsParam], Field(discriminator="type")]


class BetaClearThinking20251015EditParam(RequestModel):
    type: Literal["clear_thinking_20251015"]
    keep: ThinkingKeep | Literal["all"] = Field(
        default_factory=lambda: BetaThinkingTurnsParam(type="thinking_turns", value=1))


class BetaCompact20260112EditParam(RequestModel):
    type: Literal["compact_20260112"]
    trigger: BetaInputTokensTriggerParam | None = None
    instructions: str | None = None
    pause_after_compaction: bool = False


class UnknownContextEditParam(RequestModel):
    type: str


EDIT_TYPES = ("clear_tool_uses_20250919", "clear_thinking_20251015", "compact_20260112")

ContextEditParam = Annotated[
    Union[
        Annotated[BetaClearToolUses20250919EditParam, Tag("clear_tool_uses_20250919")],
        Annotated[BetaClearThinking20251015EditParam, Tag("clear_thinking_20251015")],
        Annotated[BetaCompact20260112EditParam, Tag("compact_20260112")],
        Annotated[UnknownContextEditParam, Tag(UNKNOWN_TAG)],
    ],
    Discriminator(tag_of(EDIT_TYPES)),
]


class BetaContextManagementConfigParam(RequestModel):
    edits: list[ContextEditParam] = Field(default_factory=list)


class BetaClearToolUses20250919EditResponse(ResponseModel):
    type: Literal["clear_tool_uses_20250919"] = "clear_tool_uses_20250919"
    cleared_input_tokens: int
    cleared_tool_uses: int


class BetaClearThinking20251015EditResponse(ResponseModel):
    type: Literal["clear_thinking_20251015"] = "clear_thinking_20251015"
    cleared_input_tokens: int
    cleared_thinking_turns: int


AppliedEdit = Annotated[
    Union[BetaClearToolUses20250919EditResponse, BetaClearThinking20251015EditResponse],
    Field(discriminator="type"),
]


class BetaContextManagementResponse(ResponseModel):
    applied_edits: list[AppliedEdit] = Field(default_factory=list)


class BetaCountTokensContextManagementResponse(ResponseModel):
    original_input_tokens: int
