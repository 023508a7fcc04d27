"""LlamaCppBaseline: the same prompts through llama.cpp (llama-cpp-python), greedy, for the
``--baseline llama-cpp`` ratio.

It drives llama.cpp's C API directly (``llama_decode`` over a multi-sequence batch), because
the high-level ``Llama`` class holds one sequence: requests run in waves of ``concurrency``
sequences, each prompt prefilled on its own and then all of a wave decoded together, one token
per sequence per ``llama_decode`` (what ``llama-batched-bench`` measures). Request rates are
not modelled: a wave starts when the previous one ends.
"""

from __future__ import annotations

import ctypes
import pathlib
import time
from typing import Any

import numpy as np

from llm_core.benchmarks.errors import BaselineUnavailableError
from llm_core.benchmarks.timeline import RequestTimeline
from llm_core.benchmarks.waves import WaveBaseline


class LlamaCppBaseline(WaveBaseline):
    name = "llama.cpp"

    def __init__(self, gguf_path: str | pathlib.Path, threads: int, max_seqs: int, n_ctx: int):
        try:
            import llama_cpp
        except ImportError as exc:
            raise BaselineUnavailableError(
                "--baseline llama-cpp needs llama-cpp-python: pip install llama-cpp-python "
                f"(it builds llama.cpp from source with cmake) [{exc}]"
            ) from exc
        self.lc: Any = llama_cpp
        self.path = pathlib.Path(gguf_path)
        lc = llama_cpp
        lc.llama_backend_init()
        # llama.cpp logs every load to stderr; keep the callback referenced while it is set.
        self._log_callback = lc.llama_log_callback(_silent)
        lc.llama_log_set(self._log_callback, ctypes.c_void_p())
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise BaselineUnavailableError(f"llama.cpp could not load {self.path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx * max_seqs
        cparams.n_batch = max(512, max_seqs)
        cparams.n_ubatch = max(512, max_seqs)
        cparams.n_seq_max = max_seqs
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise BaselineUnavailableError("llama.cpp could not create a context")
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model)))
        self.n_batch = int(cparams.n_batch)
        self.max_seqs = max_seqs
        self.batch = lc.llama_batch_init(self.n_batch, 0, max_seqs)
        self.description = f"llama.cpp {getattr(lc, '__version__', '?')}, {self.path.name}"

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def _run_wave(
        self, prompts: list[list[int]], output_len: int, arrival: float
    ) -> list[RequestTimeline]:
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        timelines = [RequestTimeline(len(p), arrival) for p in prompts]
        last: list[int] = []
        for seq, prompt in enumerate(prompts):
            for at in range(0, len(prompt), self.n_batch):
                chunk = prompt[at : at + self.n_batch]
                final = at + len(chunk) == len(prompt)
                self._fill([(t, at + j, seq, final and j == len(chunk) - 1)
                            for j, t in enumerate(chunk)])  # fmt: skip
                self._decode()
            last.append(self._argmax(len(chunk) - 1))
            timelines[seq].add_tokens(1, time.perf_counter())
        for step in range(1, output_len):
            self._fill([(last[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
            self._decode()
            now = time.perf_counter()
            for s in range(len(prompts)):
                last[s] = self._argmax(s)
                timelines[s].add_tokens(1, now)
        return timelines

    def _fill(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for j, (token, pos, seq, logits) in enumerate(tokens):
            b.token[j] = token
            b.pos[j] = pos
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = seq
            b.logits[j] = logits
        b.n_tokens = len(tokens)

    def _decode(self) -> None:
        status = self.lc.llama_decode(self.ctx, self.batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")

    def _argmax(self, row: int) -> int:
        ptr = self.lc.llama_get_logits_ith(self.ctx, row)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())


def _silent(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    return None
