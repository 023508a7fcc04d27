"""Incremental detokenization: streaming text equals decoding everything at once, and no
chunk ever carries half of a multi-byte character."""

from __future__ import annotations

import pytest
from llm_core.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Grüße aus Köln, naïve café!",
    "世界你好，今天天气很好。",
    "emoji 🙂🚀 and flags 🇫🇷 mixed with ascii",
    "  leading spaces, tabs\tand\nnewlines",
]


def stream(tokenizer, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    chunks = [detok.add([t]) for t in output]
    chunks.append(detok.flush())
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode_tiny(tiny_tokenizer, text: str) -> None:
    prompt = tiny_tokenizer.encode("Hello")
    output = tiny_tokenizer.encode(text)
    chunks = stream(tiny_tokenizer, prompt, output)
    assert "".join(chunks) == tiny_tokenizer.decode(output, skip_special_tokens=True)
    assert not any("\ufffd" in c for c in chunks)
    # Multi-byte characters span several byte-level tokens here, so some steps emit nothing.
    if any(ord(ch) > 0x7FF for ch in text):
        assert "" in chunks[:-1]


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode_smollm2(smollm2_tokenizer, text: str) -> None:
    prompt = smollm2_tokenizer.encode("Translate:")
    output = smollm2_tokenizer.encode(" " + text)
    chunks = stream(smollm2_tokenizer, prompt, output)
    full = smollm2_tokenizer.decode(prompt + output)[len(smollm2_tokenizer.decode(prompt)) :]
    assert "".join(chunks) == full
    assert not any("\ufffd" in c for c in chunks)


def test_special_tokens_are_skipped_or_kept(tiny_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    output = [*tiny_tokenizer.encode("fox"), eos]
    skipped = IncrementalDetokenizer(tiny_tokenizer, [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tiny_tokenizer, [], skip_special_tokens=False)
    assert "".join(skipped.add([t]) for t in output) == "fox"
    assert "".join(kept.add([t]) for t in output) == "fox" + tiny_tokenizer.eos_token
