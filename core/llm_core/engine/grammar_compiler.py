"""GrammarCompiler: guided-decoding requests turned into llguidance matchers, cached.

A request's :class:`~llm_core.sampling_params.GuidedDecodingParams` become one llguidance
grammar (JSON schema, regex, choice, Lark or GBNF), which is validated against the model's
tokenizer and compiled once: later requests with the same grammar start from a copy of the
compiled matcher. Each completion owns a matcher that tracks what it generated; before each
sampling step the runner asks the matchers for a bitmask of the allowed next tokens
(:func:`fill_bitmask`), which the backend applies to the logits
(``Backend.apply_token_bitmask``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from llm_core.sampling_params import GuidedDecodingParams

log = logging.getLogger("llm_core.engine")

#: Largest grammar text accepted (schema, regex or grammar, after conversion), in characters.
MAX_GRAMMAR_CHARS = 256 * 1024


class GrammarError(ValueError):
    """A guided-decoding request whose schema, regex or grammar cannot be used; the message
    says what is wrong."""


def bitmask_words(vocab_size: int) -> int:
    """32-bit words per row of a token bitmask for ``vocab_size`` tokens."""
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles guided-decoding parameters for one tokenizer; keeps the last ``cache_size``
    compiled grammars."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: set[int] | list[int],
        cache_size: int = 64,
    ) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._tokenizer: Any = None  # llguidance.LLTokenizer, built at first use (~1 s)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._executor: Any = None
        #: Seconds spent compiling grammars, and how many compiles and cache hits.
        self.compile_seconds = 0.0
        self.compiles = 0
        self.hits = 0

    # ------------------------------------------------------------------------------------------

    def grammar_of(self, params: GuidedDecodingParams) -> str:
        """The llguidance grammar (its JSON text) for the request."""
        from llguidance import LLMatcher as matcher

        if params.json is not None or params.json_object:
            schema: Any = {"type": "object"} if params.json_object else params.json
            # Compact JSON unless a whitespace pattern is given: free whitespace lets small
            # models fill max_tokens with blank lines inside a structure.
            options: Any = {"whitespace_flexible": False}
            if params.whitespace_pattern is not None:
                options = {"whitespace_pattern": params.whitespace_pattern}
            try:
                grammar = matcher.grammar_from_json_schema(schema, overrides=options)
            except ValueError as exc:
                raise GrammarError(f"invalid JSON schema: {exc}") from exc
        elif params.regex is not None:
            grammar = matcher.grammar_from_regex(params.regex)
        elif params.choice is not None:
            # Lark string literals take JSON's escapes.
            alternatives = " | ".join(json.dumps(choice) for choice in params.choice)
            grammar = matcher.grammar_from_lark(f"start: {alternatives}")
        else:
            assert params.grammar is not None
            text = params.grammar
            if "::=" in text:  # GBNF, llama.cpp's grammar format
                from llguidance.gbnf_to_lark import gbnf_to_lark

                try:
                    text = gbnf_to_lark(text)
                except Exception as exc:
                    raise GrammarError(f"invalid GBNF grammar: {exc}") from exc
            grammar = matcher.grammar_from_lark(text)
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise GrammarError(
                f"the grammar is {len(grammar)} characters long; the limit is "
                f"{MAX_GRAMMAR_CHARS}: simplify the schema or grammar"
            )
        return str(grammar)

    def matcher(self, params: GuidedDecodingParams) -> Any:
        """A fresh matcher for one completion (an ``llguidance.LLMatcher``). Raises
        GrammarError naming what is wrong when the grammar is invalid or unsatisfiable."""
        grammar = self.grammar_of(params)
        compiled = self._compiled.get(grammar)
        if compiled is not None:
            self._compiled.move_to_end(grammar)
            self.hits += 1
            return compiled.deep_copy()
        import llguidance

        tokenizer = self._llg_tokenizer()
        start = time.perf_counter()
        problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise GrammarError(f"the guided decoding grammar is invalid: {problem.strip()}")
        compiled = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise GrammarError(
                f"the guided decoding grammar is invalid: {compiled.get_error().strip()}"
            )
        mask = np.zeros((1, bitmask_words(self.vocab_size)), dtype=np.int32)
        fill_bitmask(mask, [(compiled, 0)], self)
        if not mask.any():
            raise GrammarError("the guided decoding grammar accepts no output at all")
        self.compile_seconds += time.perf_counter() - start
        self.compiles += 1
        self._compiled[grammar] = compiled
        while len(self._compiled) > self.cache_size:
            self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def executor(self) -> Any:
        """llguidance's thread pool for computing many rows' masks at once."""
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            start = time.perf_counter()
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
                )
            except ValueError as exc:
                raise GrammarError(
                    f"guided decoding needs a fast (Rust) tokenizer for this model: {exc}"
                ) from exc
            log.info("guided decoding: tokenizer ready in %.2f s", time.perf_counter() - start)
        return self._tokenizer


def fill_bitmask(mask: np.ndarray, rows: list[tuple[Any, int]], compiler: GrammarCompiler) -> None:
    """Write each matcher's allowed next tokens into row ``i`` of ``mask`` (int32, one bit per
    token: bit ``t % 32`` of word ``t // 32``), for ``rows`` = [(matcher, i), ...]."""
    import llguidance.numpy as lnp

    if len(rows) == 1:
        lnp.fill_next_token_bitmask(rows[0][0], mask, rows[0][1])
    else:
        lnp.fill_next_token_bitmask_par(compiler.executor(), rows, mask)
