"""The text a model reads for the blocks that carry found or fetched content.

``search_result`` (RAG results a client supplies), ``web_search_tool_result`` and
``web_fetch_tool_result`` (results of server tools another deployment ran, sent back in the
history), ``document`` with a text or content source, ``tool_reference`` (a deferred tool
that tool search loaded) and ``container_upload`` (a file for a container) render as plain
text; what has no text (a PDF, an encrypted search snippet) renders as a short placeholder.
Every shape is read defensively: these payloads are plain JSON and newer variants must not
fail a request.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pensieve.protocol import (
    ContainerUploadBlockParam,
    DocumentBlockParam,
    SearchResultBlockParam,
    ToolReferenceBlockParam,
    WebFetchToolResultBlockParam,
    WebSearchToolResultBlockParam,
)

ResultBlock = (SearchResultBlockParam | ToolReferenceBlockParam | ContainerUploadBlockParam
               | WebSearchToolResultBlockParam | WebFetchToolResultBlockParam | DocumentBlockParam)
RESULT_BLOCKS = (SearchResultBlockParam, ToolReferenceBlockParam, ContainerUploadBlockParam,
                 WebSearchToolResultBlockParam, WebFetchToolResultBlockParam, DocumentBlockParam)


def result_block_text(block: ResultBlock) -> str:
    """The prompt text of one of ``RESULT_BLOCKS``."""
    if isinstance(block, SearchResultBlockParam):
        return _lines(block.title, block.source, _texts(block.content))
    if isinstance(block, ToolReferenceBlockParam):
        return f"[tool loaded: {block.tool_name}]"
    if isinstance(block, ContainerUploadBlockParam):
        return f"[file uploaded: {block.file_id}]"
    if isinstance(block, WebSearchToolResultBlockParam):
        return _web_search_text(block.content)
    if isinstance(block, WebFetchToolResultBlockParam):
        return _web_fetch_text(block.content)
    return document_text(block.source, block.title, block.context)


def document_text(source: Any, title: str | None = None, context: str | None = None) -> str:
    """A document's text: a ``text`` source's data, a ``content`` source's text blocks (a
    plain string too); a placeholder naming the document for anything else (PDF, URL, file)."""
    body = None
    if isinstance(source, dict):
        kind = source.get("type")
        if kind == "text" and isinstance(source.get("data"), str):
            body = source["data"]
        elif kind == "content":
            body = _texts(source.get("content"))
    if body is None:
        return f"[document: {title}]" if title else "[document]"
    return _lines(title, context, body)


def _web_search_text(content: Any) -> str:
    if isinstance(content, dict):  # web_search_tool_result_error
        return f"[web search failed: {content.get('error_code', 'unknown error')}]"
    results = [r for r in content or () if isinstance(r, dict)]
    if not results:
        return "[web search: no results]"
    return "\n\n".join(_lines(r.get("title"), r.get("url"), r.get("page_age")) for r in results)


def _web_fetch_text(content: Any) -> str:
    if not isinstance(content, dict):
        return "[web fetch: no content]"
    if content.get("type") != "web_fetch_result":  # web_fetch_tool_result_error
        return f"[web fetch failed: {content.get('error_code', 'unknown error')}]"
    document = content.get("content")
    body = (document_text(document.get("source"), document.get("title"))
            if isinstance(document, dict) else "")
    return _lines(content.get("url"), body)


def _texts(content: Any) -> str:
    if isinstance(content, str):
        return content
    blocks: Iterable[Any] = content if isinstance(content, list) else ()
    return "\n\n".join(b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str))


def _lines(*parts: Any) -> str:
    return "\n".join(str(p) for p in parts if p)
