"""What the segmenter makes of generated text: typed pieces, in order.

A tool call arrives as ``ToolCallStart`` (its name), ``ToolCallDelta``s (its arguments as
JSON text, in pieces whose concatenation is one JSON object) and ``ToolCallEnd``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class TextSegment:
    text: str


@dataclass(frozen=True)
class ThinkingSegment:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    name: str


@dataclass(frozen=True)
class ToolCallDelta:
    partial_json: str


@dataclass(frozen=True)
class ToolCallEnd:
    complete: bool = True  # False: the arguments were cut short and closed by repair


Segment = Union[TextSegment, ThinkingSegment, ToolCallStart, ToolCallDelta, ToolCallEnd]
