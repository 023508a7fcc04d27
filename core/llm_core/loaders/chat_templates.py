"""Chat templates that llm-core ships for checkpoints that carry none.

Many GGUF files (for example llama.cpp conversions of Gemma base models) have no
``tokenizer.chat_template``; for the architectures listed here the loader attaches the family's
standard format from ``llm_core/templates/chat/``, so ``llm.chat`` and the server's
``/v1/chat/completions`` work. A template in the file always wins; so does ``--chat-template``.
"""

from __future__ import annotations

import functools
from importlib import resources

#: GGUF ``general.architecture`` -> template file in ``llm_core/templates/chat``.
BUILTIN_CHAT_TEMPLATES = {
    "gemma2": "gemma.jinja",
    "gemma3": "gemma.jinja",
}


@functools.cache
def _read(name: str) -> str:
    return resources.files("llm_core").joinpath("templates", "chat", name).read_text("utf-8")


def builtin_chat_template(gguf_architecture: str) -> str | None:
    """The built-in chat template for a GGUF architecture, or ``None`` when there is none."""
    name = BUILTIN_CHAT_TEMPLATES.get(gguf_architecture)
    return _read(name) if name is not None else None
