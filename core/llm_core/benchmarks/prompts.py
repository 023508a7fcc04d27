"""BenchPrompts: the prompts of a benchmark, as token ids: random tokens of a set length, or
the lines of a text file (or ``prompt`` fields of a JSONL file), tokenized and cut to length."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np


class BenchPrompts:
    """Makes ``num_prompts`` prompts of ``input_len`` tokens each.

    Random prompts draw token ids uniformly from the vocabulary minus the special tokens, from
    a seeded generator: the same seed gives the same prompts to every engine compared. A new
    ``round`` gives fresh prompts (so repeated iterations never hit the prefix cache).
    File prompts are used in order (cycled if there are fewer than asked), each cut to at most
    ``input_len`` tokens when ``input_len`` is given.
    """

    def __init__(
        self,
        tokenizer: Any,
        input_len: int,
        seed: int = 0,
        path: str | pathlib.Path | None = None,
    ):
        if input_len < 1:
            raise ValueError(f"--input-len must be >= 1, got {input_len}")
        self.tokenizer = tokenizer
        self.input_len = input_len
        self.seed = seed
        self.path = None if path is None else pathlib.Path(path)
        self._file_prompts = self._read_file() if self.path is not None else None

    def make(self, num_prompts: int, round: int = 0) -> list[list[int]]:
        if num_prompts < 1:
            raise ValueError(f"the number of prompts must be >= 1, got {num_prompts}")
        if self._file_prompts is not None:
            start = round * num_prompts
            n = len(self._file_prompts)
            return [self._file_prompts[(start + i) % n] for i in range(num_prompts)]
        rng = np.random.default_rng([self.seed, round])
        vocab = self._vocab_size()
        special = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        prompts = []
        for _ in range(num_prompts):
            ids = rng.integers(0, vocab, size=self.input_len * 2).tolist()
            ids = [i for i in ids if i not in special][: self.input_len]
            while len(ids) < self.input_len:  # a vocabulary that is mostly special tokens
                i = int(rng.integers(0, vocab))
                if i not in special:
                    ids.append(i)
            prompts.append(ids)
        return prompts

    def describe(self) -> str:
        if self.path is not None:
            return f"file {self.path} (<= {self.input_len} tokens each)"
        return f"random tokens ({self.input_len} each, seed {self.seed})"

    def _vocab_size(self) -> int:
        size = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else None
        return int(size or self.tokenizer.vocab_size)

    def _read_file(self) -> list[list[int]]:
        assert self.path is not None
        texts = read_texts(self.path, "prompt")
        prompts = [list(self.tokenizer.encode(t))[: self.input_len] for t in texts]
        return [p for p in prompts if p] or [[0]]


def read_texts(path: pathlib.Path, kind: str) -> list[str]:
    """The non-blank lines of a text file, or the ``prompt`` field of each line of a .jsonl
    file (``kind`` names them in errors: "prompt", "paragraph")."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {path} does not exist")
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(str(json.loads(line)["prompt"]) if path.suffix == ".jsonl" else line)
    if not texts:
        raise ValueError(f"{kind} file {path} has no {kind}s")
    return texts
