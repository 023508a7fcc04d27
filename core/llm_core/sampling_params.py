"""SamplingParams: how to generate, with vLLM's field names, defaults and meanings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: The grammar library guided decoding runs on (see docs/structured-output.md).
GUIDED_BACKENDS = ("guidance", "llguidance")


@dataclass(slots=True)
class GuidedDecodingParams:
    """Constrain a completion to a language (vLLM's ``GuidedDecodingParams``); give one of:

    - ``json``: a JSON schema (a dict or its JSON text): the output is a JSON value valid
      against it;
    - ``json_object``: True: the output is a JSON object (any keys);
    - ``regex``: the output matches this regular expression (whole);
    - ``choice``: the output is exactly one of these strings;
    - ``grammar``: a context-free grammar, in Lark syntax (llguidance's dialect) or GBNF
      (llama.cpp's; recognised by its ``::=`` rules).

    ``whitespace_pattern`` (JSON only): a regex for the whitespace allowed between JSON tokens
    (default: any JSON whitespace). ``backend``: None or "guidance" (llguidance, the only one).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("json", "regex", "choice", "grammar", "json_object")
            if getattr(self, name) not in (None, False)
        ]
        if len(given) != 1:
            raise ValueError(
                "invalid guided decoding: give exactly one of json, json_object, regex, choice, "
                f"grammar (given: {', '.join(given) or 'none'})"
            )
        if self.backend is not None and self.backend not in GUIDED_BACKENDS:
            raise ValueError(
                f"invalid guided decoding backend {self.backend!r}: llm-core guides with "
                f"llguidance ({' or '.join(repr(b) for b in GUIDED_BACKENDS)})"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("invalid guided decoding: choice must be non-empty strings")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(
                    f"invalid guided decoding: json is not valid JSON ({exc})"
                ) from exc
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError("invalid guided decoding: json must be a JSON schema object")


@dataclass(slots=True)
class SamplingParams:
    """Parameters of one generation request (vLLM-compatible).

    - ``n``: number of completions returned for the prompt.
    - ``temperature``: 0 means greedy. ``top_p`` (0, 1], ``top_k`` (0 or -1 = off), ``min_p``
      [0, 1].
    - ``seed``: makes sampling reproducible for this request, whatever else is in the batch.
    - ``presence_penalty``, ``frequency_penalty`` in [-2, 2] (output tokens);
      ``repetition_penalty`` > 0 (prompt and output tokens; 1 = off).
    - ``stop``: strings that end the output (not included unless ``include_stop_str_in_output``);
      ``stop_token_ids``: token ids that end it (included in the token ids, like EOS).
    - ``ignore_eos``: keep generating past EOS. ``max_tokens``: at most this many new tokens
      (None: up to the model's length). ``min_tokens``: EOS and stop tokens are banned before.
    - ``logprobs``: number of top log-probabilities returned per generated token (None: none);
      ``prompt_logprobs`` likewise for prompt tokens.
    - ``skip_special_tokens``, ``spaces_between_special_tokens``: detokenization.
    - ``guided_decoding``: constrain the output to a JSON schema, regex, choice or grammar
      (:class:`GuidedDecodingParams`).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    guided_decoding: GuidedDecodingParams | None = None
    _stop_strings: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self._stop_strings = []
        elif isinstance(self.stop, str):
            self._stop_strings = [self.stop]
        else:
            self._stop_strings = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"invalid sampling parameter: {what}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad(f"top_k must be -1 (off), 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise bad(f"{name} must be in [-2, 2], got {value}")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise bad(f"{name} must be >= 0, got {value}")
        if any(not s for s in self._stop_strings):
            raise bad("stop strings must not be empty")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer, got {self.seed!r}")

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_strings

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self) -> SamplingParams:
        from copy import deepcopy

        return deepcopy(self)
