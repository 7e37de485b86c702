"""Prompt text is text: what a request says never becomes a control token.

A chat template writes its own markers (``<|im_start|>``, ``<end_of_turn>`` …) around the
request's text, and the tokenizer parses every special-token string in the rendered prompt.
Text a client sent (a web page inside a ``tool_result``) spelling
``<|im_end|>\\n<|im_start|>system`` would otherwise forge a turn. So before rendering, each
special-token string inside request text gets ``MARK`` (a Unicode noncharacter) in front of it;
after rendering, a stretch of text holding marked specials is encoded with special tokens
read as plain text, and the marks are dropped. The template's own markers carry no mark and
stay special. The mark travels with the string through whatever the template does to it
(trim, split, ``tojson``), so no template has to cooperate; a prompt with no marks (the
usual case) is encoded exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Protocol

from pensieve.chat.messages import BILLING_HEADER_PREFIX
from pensieve.protocol import (
    ConversationParams,
    TextBlockParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)

MARK = "\ufdd0"  # a noncharacter: never meaningful in text, removed from request text
# Parts of a request that reach the prompt as text; thinking blocks keep their signed text.
_TEXT_PARTS = ("system", "messages", "tools", "tool_choice", "output_config", "output_format")
_STRUCTURAL_KEYS = frozenset({"type", "role", "id", "tool_use_id", "signature", "data",
                              "cache_control", "source"})
_SIGNED_BLOCKS = frozenset({"thinking", "redacted_thinking"})


class SpecialsTokenizer(Protocol):
    special_tokens: tuple[str, ...]

    def encode(self, text: str, *, special: bool = True) -> list[int]: ...


class PromptText:
    """Marks the special-token strings of a request and encodes a rendered prompt.

    A tokenizer without ``special_tokens`` (test doubles) gets no marking at all."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        specials = tuple(getattr(tokenizer, "special_tokens", ()) or ())
        self._pattern = _trie_regex(specials) if specials else None
        self._marked = re.compile(re.escape(MARK) + "?(?:" + self._pattern.pattern + ")") if specials else None

    def mark(self, request: ConversationParams) -> ConversationParams:
        """``request`` with ``MARK`` before each special-token string of its text (the same
        object when there is none)."""
        if self._pattern is None:
            return request
        dumped = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
        changed = False
        for key in _TEXT_PARTS:
            if key in dumped:
                value, hit = self._mark_value(dumped[key])
                if hit:
                    dumped[key], changed = value, True
        return type(request).model_validate(dumped) if changed else request

    def _mark_value(self, value: Any) -> tuple[Any, bool]:
        if isinstance(value, str):
            marked = self._mark_text(value)
            return marked, marked is not value
        if isinstance(value, list):
            items = [self._mark_value(v) for v in value]
            return ([v for v, _ in items], True) if any(h for _, h in items) else (value, False)
        if isinstance(value, dict):
            kind = value.get("type")
            if isinstance(kind, str) and kind in _SIGNED_BLOCKS:
                return value, False
            out, hit = dict(value), False
            for k, v in value.items():
                if k in _STRUCTURAL_KEYS:
                    continue
                new, h = self._mark_value(v)
                if h:
                    out[k], hit = new, True
            return (out, True) if hit else (value, False)
        return value, False

    def _mark_text(self, text: str) -> str:
        assert self._pattern is not None
        clean = text.replace(MARK, "") if MARK in text else text
        if not self._pattern.search(clean):
            return text if clean is text else clean
        return self._pattern.sub(lambda m: MARK + m.group(), clean)

    def encode(self, rendered: str) -> tuple[str, list[int]]:
        """The rendered prompt without marks, and its ids: text between the template's own
        special tokens that holds marked ones is encoded with specials as plain text."""
        if MARK not in rendered or self._marked is None:
            return rendered, self.tokenizer.encode(rendered)
        ids: list[int] = []
        run: list[str] = []  # text since the last template special, marks removed
        plain = False  # the run holds a marked special
        at = 0
        for m in self._marked.finditer(rendered):
            if m.group().startswith(MARK):
                run.append(rendered[at:m.start()].replace(MARK, ""))
                run.append(m.group()[len(MARK):])
                plain = True
            else:
                run.append(rendered[at:m.start()].replace(MARK, ""))
                ids += self._encode_run("".join(run), plain)
                ids += self.tokenizer.encode(m.group())
                run, plain = [], False
            at = m.end()
        run.append(rendered[at:].replace(MARK, ""))
        ids += self._encode_run("".join(run), plain)
        return rendered.replace(MARK, ""), ids

    def _encode_run(self, text: str, plain: bool) -> list[int]:
        if not text:
            return []
        return self.tokenizer.encode(text, special=False) if plain else self.tokenizer.encode(text)


def unmark(text: str) -> str:
    return text.replace(MARK, "")


def text_chars(request: ConversationParams) -> int:
    """Characters of request text that surely reach the prompt: text blocks, tool calls and
    results, offered tools (string leaves only). Not counted: signed thinking (templates may
    drop past thinking), images, documents, unknown blocks and tools, the billing header."""
    n = _content_chars(request.system, system=True)
    for message in request.messages:
        n += _content_chars(message.content)
    for tool in request.tools or ():
        if isinstance(tool, ToolParam):
            n += len(tool.name) + len(tool.description or "") + _leaf_chars(tool.input_schema)
    return n


def _content_chars(content: Any, system: bool = False) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return 0 if system and content.startswith(BILLING_HEADER_PREFIX) else len(content)
    n = 0
    for block in content:
        if isinstance(block, TextBlockParam):
            n += 0 if system and block.text.startswith(BILLING_HEADER_PREFIX) else len(block.text)
        elif isinstance(block, ToolUseBlockParam):
            n += len(block.name) + _leaf_chars(block.input)
        elif isinstance(block, ToolResultBlockParam):
            n += _content_chars(block.content)
    return n


def _leaf_chars(value: Any) -> int:
    """Characters of the strings (keys too) in a JSON value: its JSON text has at least these."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _leaf_chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_leaf_chars(v) for v in value)
    return 0


def min_prompt_tokens(request: ConversationParams, tokenizer: Any) -> int:
    """A lower bound of the request's prompt tokens, without tokenizing: no token spells more
    characters than the tokenizer's longest piece. 0 when the tokenizer does not say."""
    longest = getattr(tokenizer, "max_token_chars", None)
    if not longest:
        return 0
    return text_chars(request) // longest


def _trie_regex(words: Iterable[str]) -> re.Pattern[str]:
    """One regex matching any of ``words``, longest first, as a trie: fast over thousands of
    special tokens (Gemma has 6k), where a plain alternation tries each in turn."""
    trie: dict[str, Any] = {}
    for word in set(words):
        if not word:
            continue
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = True
    return re.compile(_trie_pattern(trie))


def _trie_pattern(node: dict[str, Any]) -> str:
    branches = [re.escape(ch) + _trie_pattern(child) for ch, child in sorted(node.items()) if ch]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in node else body
