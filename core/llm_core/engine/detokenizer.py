"""Incremental detokenization that never emits half a multi-byte character.

Decoding token by token is wrong for byte-level BPE: one character can span several tokens,
and a lone token decodes to U+FFFD. Like vLLM, we decode a small window of recent tokens twice,
with and without the newest ones, and emit the difference only once it no longer ends in an
incomplete character.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text, one step at a time."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between = spaces_between_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids)
        # Start the window a few tokens back in the prompt so the first output token gets its
        # leading space right (sentencepiece-style tokenizers drop it at the start of a text).
        self.prefix_offset = max(len(self.token_ids) - 6, 0)
        self.read_offset = len(self.token_ids)

    def _decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(
                ids,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between,
                clean_up_tokenization_spaces=False,
            )
        )

    def _window(self) -> tuple[str, str]:
        """The window's text without and with the tokens not yet emitted."""
        window = self.token_ids[self.prefix_offset :]
        return self._decode(window[: self.read_offset - self.prefix_offset]), self._decode(window)

    def add(self, token_ids: list[int]) -> str:
        """Append new token ids; returns the text they complete (possibly empty)."""
        self.token_ids.extend(token_ids)
        prefix_text, full_text = self._window()
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back (may contain U+FFFD)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix_text, full_text = self._window()
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text) :]
