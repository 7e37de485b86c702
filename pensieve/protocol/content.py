"""Content blocks a request may carry, named as the anthropic SDK names them (``…Param``).

``ContentBlockParam`` is keyed on ``type``; a block type we do not model (``server_tool_use``,
code-execution results, anything newer) validates into ``UnknownBlockParam`` and is ignored
later, never refused. The blocks of the 2026 surface that carry text a model can read
(``search_result``, ``web_search_tool_result``, ``web_fetch_tool_result``, ``tool_reference``,
``container_upload``) are modelled loosely: their payloads stay plain JSON, so a variant newer
than us still validates.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, Discriminator, Tag

from pensieve.protocol.base import UNKNOWN_TAG, RequestModel, tag_of


class CacheControlEphemeralParam(RequestModel):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: str | None = None


class TextBlockParam(RequestModel):
    type: Literal["text"]
    text: str
    cache_control: CacheControlEphemeralParam | None = None
    citations: list[dict[str, Any]] | None = None


class ImageBlockParam(RequestModel):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlockParam(RequestModel):
    type: Literal["document"]
    source: dict[str, Any]
    title: str | None = None
    context: str | None = None


class ThinkingBlockParam(RequestModel):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""  # the API requires it; we accept its absence (we never verify it)


class RedactedThinkingBlockParam(RequestModel):
    type: Literal["redacted_thinking"]
    data: str


class ToolUseBlockParam(RequestModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class SearchResultBlockParam(RequestModel):
    type: Literal["search_result"]
    source: str = ""
    title: str = ""
    content: list[dict[str, Any]] | str = Field(default_factory=list)


class ToolReferenceBlockParam(RequestModel):
    """Names a deferred tool (``defer_loading``) that tool search found: it is offered from here on."""

    type: Literal["tool_reference"]
    tool_name: str


class ContainerUploadBlockParam(RequestModel):
    type: Literal["container_upload"]
    file_id: str = ""


class WebSearchToolResultBlockParam(RequestModel):
    type: Literal["web_search_tool_result"]
    tool_use_id: str = ""
    content: Any = None  # a list of web_search_result blocks, or an error object


class WebFetchToolResultBlockParam(RequestModel):
    type: Literal["web_fetch_tool_result"]
    tool_use_id: str = ""
    content: Any = None  # a web_fetch_result (url + document), or an error object


class UnknownBlockParam(RequestModel):
    """Any block type we do not model; kept whole, ignored when rendering."""

    type: str


class ToolResultBlockParam(RequestModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ContentBlockParam] | None = None
    is_error: bool | None = Field(default=None, strict=True)


_BLOCK_TYPES = ("text", "image", "document", "thinking", "redacted_thinking", "tool_use", "tool_result",
                "search_result", "tool_reference", "container_upload", "web_search_tool_result",
                "web_fetch_tool_result")

ContentBlockParam = Annotated[
    Union[
        Annotated[TextBlockParam, Tag("text")],
        Annotated[ImageBlockParam, Tag("image")],
        Annotated[DocumentBlockParam, Tag("document")],
        Annotated[ThinkingBlockParam, Tag("thinking")],
        Annotated[RedactedThinkingBlockParam, Tag("redacted_thinking")],
        Annotated[ToolUseBlockParam, Tag("tool_use")],
        Annotated[ToolResultBlockParam, Tag("tool_result")],
        Annotated[SearchResultBlockParam, Tag("search_result")],
        Annotated[ToolReferenceBlockParam, Tag("tool_reference")],
        Annotated[ContainerUploadBlockParam, Tag("container_upload")],
        Annotated[WebSearchToolResultBlockParam, Tag("web_search_tool_result")],
        Annotated[WebFetchToolResultBlockParam, Tag("web_fetch_tool_result")],
        Annotated[UnknownBlockParam, Tag(UNKNOWN_TAG)],
    ],
    Discriminator(tag_of(_BLOCK_TYPES)),
]

ToolResultBlockParam.model_rebuild()

# What ``content`` of a message may be: a string is shorthand for one text block.
MessageContentParam = Union[str, list[ContentBlockParam]]
