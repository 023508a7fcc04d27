"""Reasoning parsers: the model's thinking, ``<think>...</think>``, apart from its answer.

``qwen3`` (Qwen3, QwQ): the answer reasons only when it opens with ``<think>`` (Qwen3 with
``enable_thinking: false`` writes no tags, and all of it is content). ``deepseek_r1``: the
answer starts inside the reasoning, with or without ``<think>`` (DeepSeek-R1's template opens
it), until ``</think>``. With either, a prompt that ends with an open ``<think>`` (the template
opened it) starts the answer inside the reasoning, and one that ends with a closed
``</think>`` (thinking turned off) starts it outside.

Reasoning that never closes (the answer hit max_tokens) is all reasoning. The content after
``</think>`` starts at its first non-blank character.
"""

from __future__ import annotations

from typing import ClassVar


class ReasoningParser:
    """Splits one answer into reasoning and content; one instance per answer."""

    #: The name ``--reasoning-parser`` takes.
    name: ClassVar[str] = ""
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    #: The answer starts inside the reasoning even without ``start``.
    starts_inside: ClassVar[bool] = False

    def __init__(self, prompt: str = "", inside: bool | None = None):
        """``prompt``: the text the answer follows; ``inside``: whether the answer starts
        inside the reasoning (None: as the prompt and the parser say)."""
        tail = prompt.rstrip()
        if inside is not None:
            self.inside = inside
        elif tail.endswith(self.start):
            self.inside = True
        elif tail.endswith(self.end):
            self.inside = False
        else:
            self.inside = self.starts_inside

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """``(reasoning, content)`` of ``text``. Unless ``final``, the text may still grow and
        only what cannot change is returned (a partial tag is held back)."""
        lead = text.lstrip()
        if lead.startswith(self.start):
            body = lead[len(self.start) :]
        elif not final and self.start.startswith(lead):
            return "", ""  # nothing yet, or perhaps the start tag
        elif self.inside:
            body = text
        else:
            return "", text
        end = body.find(self.end)
        if end >= 0:
            return body[:end], body[end + len(self.end) :].lstrip()
        if final:
            return body, ""
        return body[: len(body) - _partial_suffix(body, self.end)], ""


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_inside = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    parser.name: parser for parser in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def reasoning_parser_class(name: str) -> type[ReasoningParser]:
    """The parser called ``name``; ValueError listing the known ones otherwise."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}"
        ) from None


def detect_reasoning_parser(chat_template: str | None) -> type[ReasoningParser] | None:
    """The parser for a chat template that knows ``</think>``: deepseek_r1 for DeepSeek's
    (``<｜Assistant｜>``), qwen3 for the others; None for a template without reasoning."""
    if not chat_template or ReasoningParser.end not in chat_template:
        return None
    if "<｜Assistant｜>" in chat_template:
        return DeepSeekR1ReasoningParser
    return Qwen3ReasoningParser


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (but is not all of it)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
