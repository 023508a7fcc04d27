"""SamplingParams: how to generate, with vLLM's field names, defaults and meanings."""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("llm_core.sampling")

#: The grammar library guided decoding runs on (see docs/structured-output.md).
GUIDED_BACKENDS = ("guidance", "llguidance")
#: Most completions per request: vLLM's default ``VLLM_MAX_N_SEQUENCES``.
MAX_N = 16384
#: Most top log-probabilities per token (``logprobs``, ``prompt_logprobs``): vLLM's default
#: ``max_logprobs``, and OpenAI's limit on ``top_logprobs``.
MAX_LOGPROBS = 20
#: A positive temperature below this is raised to it (vLLM's ``_MAX_TEMP``): logits divided
#: by less overflow, and sampling returns garbage.
MIN_TEMPERATURE = 1e-2
_INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: The fields that are flags: True or False, nothing else.
_FLAGS = (
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "detokenize",
)


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
    (default: none, compact JSON). ``backend``: None or "guidance" (llguidance, the only one).
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

    - ``n``: number of completions returned for the prompt, in [1, ``MAX_N``].
    - ``temperature``: >= 0; 0 means greedy, and a positive value below ``MIN_TEMPERATURE``
      is raised to it (as vLLM does). ``top_p`` in (0, 1]; ``top_k`` -1 or 0 (off) or a
      positive int32; ``min_p`` in [0, 1].
    - ``seed``: an int64; makes sampling reproducible for this request, whatever else is in
      the batch.
    - ``presence_penalty``, ``frequency_penalty`` in [-2, 2] (output tokens);
      ``repetition_penalty`` > 0 (prompt and output tokens; 1 = off).
    - ``stop``: strings that end the output (not included unless ``include_stop_str_in_output``);
      ``stop_token_ids``: token ids that end it (included in the token ids, like EOS).
    - ``ignore_eos``: keep generating past EOS. ``max_tokens``: at most this many new tokens,
      >= 1 (None: up to the model's length). ``min_tokens`` in [0, ``max_tokens``]: EOS and
      stop tokens are banned before.
    - ``logprobs``: number of top log-probabilities returned per generated token, in
      [0, ``MAX_LOGPROBS``] (None: none); ``prompt_logprobs`` likewise for prompt tokens.
    - ``skip_special_tokens``, ``spaces_between_special_tokens``: detokenization.
    - ``guided_decoding``: constrain the output to a JSON schema, regex, choice or grammar
      (:class:`GuidedDecodingParams`).

    Every field is checked on construction: a value of the wrong type (a bool or a string
    where a number belongs, a float where an integer belongs), NaN, an infinity or a value out
    of range raises ValueError naming the field and what it allows. Numbers are stored as
    Python ``int`` and ``float``.
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
        self._stop_strings = _stop_strings(self.stop)
        self.stop_token_ids = _token_ids(self.stop_token_ids)
        self._validate()

    def _validate(self) -> None:
        # Every range check is written so that NaN fails it: finiteness first, then
        # ``not (low <= x <= high)``; a plain ``x < 0`` lets NaN through.
        self.n = _integer("n", self.n, 1, MAX_N)
        self.temperature = _real("temperature", self.temperature, 0.0, None)
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            log.warning(
                "temperature %g is below %g, where the scaled logits overflow; using %g",
                self.temperature,
                MIN_TEMPERATURE,
                MIN_TEMPERATURE,
            )
            self.temperature = MIN_TEMPERATURE
        self.top_p = _real("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = _integer("top_k", self.top_k, -1, _INT32_MAX, "(-1 or 0: off)")
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _real("min_p", self.min_p, 0.0, 1.0)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _real(name, getattr(self, name), -2.0, 2.0))
        self.repetition_penalty = _real(
            "repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True
        )
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, _INT64_MIN, _INT64_MAX, "(int64)")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, 1, None, "or None")
        note = "(at most max_tokens)" if self.max_tokens is not None else ""
        self.min_tokens = _integer("min_tokens", self.min_tokens, 0, self.max_tokens, note)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _integer(name, value, 0, MAX_LOGPROBS, "or None"))
        for name in _FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _invalid(f"{name} must be true or false, got {_shown(value)}")
        if self.guided_decoding is not None and not isinstance(
            self.guided_decoding, GuidedDecodingParams
        ):
            raise _invalid(
                "guided_decoding must be a GuidedDecodingParams, got "
                f"{type(self.guided_decoding).__name__}"
            )

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_strings

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self) -> SamplingParams:
        from copy import deepcopy

        return deepcopy(self)


def _invalid(what: str) -> ValueError:
    return ValueError(f"invalid sampling parameter: {what}")


def _is_number(value: object) -> bool:
    """An int or a float, numpy's included; a bool is a flag here, not a number."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _shown(value: object) -> str:
    """``value`` for an error message, cut short: a request may send a huge number."""
    try:
        text = repr(value)
    except ValueError:  # an int too long for repr
        return "a number too large to print"
    return text if len(text) <= 40 else text[:37] + "..."


def _bound(x: int) -> str:
    return {_INT64_MIN: "-2**63", _INT64_MAX: "2**63 - 1"}.get(x, str(x))


def _real(
    name: str, value: object, low: float, high: float | None, *, low_open: bool = False
) -> float:
    """``value`` as a float if it is a finite number in range, else a ValueError naming
    ``name`` and the range. ``high`` None: no upper bound; ``low_open``: ``low`` excluded."""
    if high is None:
        allowed = f"{'>' if low_open else '>='} {low:g} (a finite number)"
    else:
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    problem = _invalid(f"{name} must be {allowed}, got {_shown(value)}")
    if not _is_number(value):
        raise problem
    try:
        x = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond the float range
        raise problem from None
    if not math.isfinite(x):
        raise problem
    if not ((x > low if low_open else x >= low) and (high is None or x <= high)):
        raise problem
    return x


def _integer(name: str, value: object, low: int, high: int | None, note: str = "") -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) in ``[low, high]``,
    else a ValueError naming ``name`` and the range (``high`` None: no upper bound)."""
    allowed = f">= {low}" if high is None else f"in [{_bound(low)}, {_bound(high)}]"
    problem = _invalid(
        f"{name} must be an integer {allowed}{' ' if note else ''}{note}, got {_shown(value)}"
    )
    if not isinstance(value, numbers.Integral) or isinstance(value, bool | np.bool_):
        raise problem
    number = int(value)
    if not (number >= low and (high is None or number <= high)):
        raise problem
    return number


def _stop_strings(stop: object) -> list[str]:
    strings = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(strings, list | tuple) or not all(isinstance(s, str) for s in strings):
        raise _invalid(f"stop must be a string or a list of strings, got {_shown(stop)}")
    if not all(strings):
        raise _invalid("stop strings must not be empty")
    return list(strings)


def _token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, list | tuple):
        raise _invalid(f"stop_token_ids must be a list of token ids, got {_shown(ids)}")
    return [
        _integer(f"stop_token_ids[{i}]", t, 0, _INT64_MAX, "(a token id)")
        for i, t in enumerate(ids)
    ]
