"""Anthropic request → prompt text and token ids, through the model's chat template.

``render`` is the only way a request becomes tokens: ``count_tokens`` uses it too, so the
count always equals the ``input_tokens`` reported by ``message_start``.

A trailing assistant message is a prefill: the conversation renders without a generation
prompt and is cut right after that message's text, so the model continues it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pensieve.chat.messages import (
    TemplateMessage,
    conversation_messages,
    fit_roles,
    template_tools,
)
from pensieve.chat.template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError
from pensieve.protocol import ConversationParams

log = logging.getLogger(__name__)

_PROBE_SYSTEM = "PENSIEVE-PROBE-SYSTEM"
_PROBE_MID_SYSTEM = "PENSIEVE-PROBE-MID-SYSTEM"


class PromptTokenizer(Protocol):
    """What rendering needs of ``pensieve.loaders.tokenizer.TextTokenizer``."""

    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class RenderedPrompt:
    text: str  # what the template produced (without a BOS the renderer prepended as an id)
    token_ids: list[int]
    prefill: str = ""  # the assistant text the model continues, "" when none

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class TemplateCaps:
    """Where the template lets a system message go (found by rendering probes)."""

    system_first: bool
    system_anywhere: bool


class PromptRenderer:
    """Renders requests for one model: its tokenizer and its chat template.

    ``chat_template`` None or empty → ChatML. ``template_kwargs`` are passed to every render
    (e.g. ``{"enable_thinking": False}`` for templates that read it).
    """

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        chat_template: str | None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate(chat_template or CHATML_TEMPLATE)
        self.template_kwargs = dict(template_kwargs or {})
        self.caps = self._probe_caps()

    def render(self, request: ConversationParams) -> RenderedPrompt:
        """Prompt for ``request``. Raises ``ChatTemplateError`` if the template refuses it."""
        messages = fit_roles(
            conversation_messages(request),
            system_first=self.caps.system_first,
            system_anywhere=self.caps.system_anywhere,
        )
        tools = template_tools(request)
        prefill = ""
        if messages and messages[-1]["role"] == "assistant":
            prefill = messages[-1]["content"]
            if not prefill.strip():  # an empty prefill is no prefill
                messages, prefill = messages[:-1], ""
        if prefill:
            text = self._render_continuation(messages, tools, prefill)
        else:
            text = self._render(messages, tools, add_generation_prompt=True)
        return RenderedPrompt(text=text, token_ids=self._encode(text), prefill=prefill)

    def count_tokens(self, request: ConversationParams) -> int:
        return self.render(request).num_tokens

    def _render(
        self, messages: list[TemplateMessage], tools: list[dict[str, Any]] | None, *, add_generation_prompt: bool
    ) -> str:
        return self.template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokenizer.bos_token or "",
            eos_token=self.tokenizer.eos_token or "",
            **self.template_kwargs,
        )

    def _render_continuation(
        self, messages: list[TemplateMessage], tools: list[dict[str, Any]] | None, prefill: str
    ) -> str:
        """The conversation ending inside the last (assistant) message, right after its text."""
        full = self._render(messages, tools, add_generation_prompt=False)
        # Templates may trim the content: look for it without surrounding whitespace.
        needle = prefill.strip()
        at = full.rfind(needle)
        if at >= 0:
            return full[: at + len(needle)]
        log.debug("prefill not found in the rendered template; appending it to a generation prompt")
        return self._render(messages[:-1], tools, add_generation_prompt=True) + prefill.rstrip()

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        tok = self.tokenizer
        bos = tok.bos_token
        if tok.add_bos and tok.bos_token_id is not None and not (bos and text.startswith(bos)):
            ids = [tok.bos_token_id, *ids]
        return ids

    def _probe_caps(self) -> TemplateCaps:
        first = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "hi"}]
        mid = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": _PROBE_MID_SYSTEM},
            {"role": "user", "content": "bye"},
        ]
        caps = TemplateCaps(
            system_first=self._renders(first, _PROBE_SYSTEM),
            system_anywhere=self._renders(mid, _PROBE_MID_SYSTEM),
        )
        log.debug("chat template caps: %s", caps)
        return caps

    def _renders(self, messages: list[TemplateMessage], marker: str) -> bool:
        try:
            return marker in self._render(messages, None, add_generation_prompt=True)
        except (ChatTemplateError, TypeError, ValueError, KeyError, IndexError):
            return False
