"""SamplingParams checks every field: type (a bool is not a number, a float is not an int),
NaN and the infinities (1e309 is how JSON spells one), and range, with a message that names
the field and what it allows. Valid values, numpy's included, are kept as Python numbers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from llm_core.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MIN_TEMPERATURE,
    GuidedDecodingParams,
    SamplingParams,
)

NAN, INF = float("nan"), float("inf")
#: What every number field refuses, whatever its range: not finite, or not a number.
NOT_FINITE = [NAN, INF, -INF, float("1e309"), float("-1e309")]
NOT_NUMBERS = [True, False, np.bool_(True), "0.5", "1", None, [1], b"1", 1j]
HUGE_INT = 10**400  # beyond the float range: float() would raise OverflowError

# field -> (values it must refuse besides NOT_FINITE and NOT_NUMBERS, the message's range)
FLOAT_FIELDS: dict[str, tuple[list[Any], str]] = {
    "temperature": ([-1e-9, -1.0, -INF, HUGE_INT, -HUGE_INT], ">= 0 (a finite number)"),
    "top_p": ([0, 0.0, -0.1, 1.0000001, 2, HUGE_INT], "in (0, 1]"),
    "min_p": ([-1e-9, 1.5, HUGE_INT], "in [0, 1]"),
    "presence_penalty": ([-2.01, 2.01, 100, HUGE_INT], "in [-2, 2]"),
    "frequency_penalty": ([-2.01, 2.01, -100, -HUGE_INT], "in [-2, 2]"),
    "repetition_penalty": ([0, 0.0, -1.0, HUGE_INT], "> 0 (a finite number)"),
}
# field -> (values it must refuse besides NOT_FINITE and NOT_NUMBERS, the message's range)
INT_FIELDS: dict[str, tuple[list[Any], str]] = {
    "n": ([0, -1, MAX_N + 1, 1.0, 2.5], f"in [1, {MAX_N}]"),
    "top_k": ([-2, 2**31, HUGE_INT, 1.0], "in [-1, 2147483647]"),
    "seed": ([2**63, -(2**63) - 1, HUGE_INT, 1.0], "in [-2**63, 2**63 - 1]"),
    "max_tokens": ([0, -1, 16.0, 1.5], ">= 1"),
    "min_tokens": ([-1, 17, 0.0, HUGE_INT], "in [0, 16]"),  # max_tokens is 16
    "logprobs": ([-1, MAX_LOGPROBS + 1, HUGE_INT, 1.0], f"in [0, {MAX_LOGPROBS}]"),
    "prompt_logprobs": ([-1, MAX_LOGPROBS + 1, 2.0], f"in [0, {MAX_LOGPROBS}]"),
}
FLAGS = [
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "detokenize",
]


def _cases(fields: dict[str, tuple[list[Any], str]]) -> list[Any]:
    return [
        pytest.param(name, value, allowed, id=f"{name}={value!r:.20}")
        for name, (bad, allowed) in fields.items()
        for value in [*NOT_FINITE, *NOT_NUMBERS, *bad]
        # None means "not set" for these optional fields
        if not (value is None and name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"))
    ]


@pytest.mark.parametrize(("name", "value", "allowed"), _cases(FLOAT_FIELDS))
def test_a_float_field_refuses_what_is_not_a_finite_number_in_range(
    name: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ValueError) as refused:
        SamplingParams(**{name: value})
    message = str(refused.value)
    assert message.startswith(f"invalid sampling parameter: {name} must be {allowed}")


@pytest.mark.parametrize(("name", "value", "allowed"), _cases(INT_FIELDS))
def test_an_integer_field_refuses_what_is_not_an_integer_in_range(
    name: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ValueError) as refused:
        SamplingParams(**{name: value})
    message = str(refused.value)
    assert message.startswith(f"invalid sampling parameter: {name} must be an integer")
    assert allowed in message


def test_nan_is_named_in_the_message() -> None:
    with pytest.raises(ValueError) as refused:
        SamplingParams(temperature=NAN)
    assert str(refused.value) == (
        "invalid sampling parameter: temperature must be >= 0 (a finite number), got nan"
    )
    with pytest.raises(
        ValueError, match=r"repetition_penalty must be > 0 \(a finite number\), got nan"
    ):
        SamplingParams(repetition_penalty=NAN)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got nan"):
        SamplingParams(top_p=NAN)


def test_a_huge_number_is_cut_short_in_the_message() -> None:
    with pytest.raises(ValueError) as refused:
        SamplingParams(seed=10**5000)  # too long even for repr()
    assert "seed must be an integer" in str(refused.value) and len(str(refused.value)) < 200
    with pytest.raises(ValueError) as refused:
        SamplingParams(temperature=HUGE_INT)
    assert len(str(refused.value)) < 200


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_tokens": 5, "max_tokens": 4},
        {"min_tokens": 1, "max_tokens": 0},
    ],
)
def test_min_tokens_is_at_most_max_tokens(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid sampling parameter"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "ids",
    [[-1], [2**63], [NAN], [1.0], [True], ["5"], [None], [1, 2, -3], "12", 5, {1: 2}],
    ids=repr,
)
def test_stop_token_ids_are_token_ids(ids: Any) -> None:
    with pytest.raises(ValueError, match="invalid sampling parameter: stop_token_ids"):
        SamplingParams(stop_token_ids=ids)


@pytest.mark.parametrize("stop", [5, [1], ["a", None], [""], "", {"a": 1}], ids=repr)
def test_stop_is_a_string_or_a_list_of_non_empty_strings(stop: Any) -> None:
    with pytest.raises(ValueError, match="invalid sampling parameter: stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("name", FLAGS)
@pytest.mark.parametrize("value", [None, 0, 1, "false", NAN], ids=repr)
def test_flags_are_true_or_false(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"invalid sampling parameter: {name} must be true or"):
        SamplingParams(**{name: value})


def test_guided_decoding_must_be_its_params_class() -> None:
    with pytest.raises(ValueError, match="guided_decoding must be a GuidedDecodingParams"):
        SamplingParams(guided_decoding={"regex": "a+"})  # type: ignore[arg-type]
    assert SamplingParams(guided_decoding=GuidedDecodingParams(regex="a+")).guided_decoding


# ---- what is accepted -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", 0),
        ("temperature", 0.0),
        ("temperature", 1),
        ("temperature", 2.0),
        ("temperature", 1e300),
        ("temperature", np.float32(0.5)),
        ("top_p", 1e-12),
        ("top_p", 1),
        ("top_p", np.float64(0.9)),
        ("min_p", 0),
        ("min_p", 1.0),
        ("presence_penalty", -2),
        ("presence_penalty", 2.0),
        ("frequency_penalty", -2.0),
        ("frequency_penalty", 0.5),
        ("repetition_penalty", 1e-6),
        ("repetition_penalty", 1e6),
    ],
    ids=repr,
)
def test_valid_float_values_are_kept_as_python_floats(name: str, value: Any) -> None:
    kept = getattr(SamplingParams(**{name: value}), name)
    assert type(kept) is float and kept == float(value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n", 1),
        ("n", MAX_N),
        ("n", np.int64(3)),
        ("top_k", 0),
        ("top_k", 1),
        ("top_k", 2**31 - 1),
        ("top_k", np.int32(40)),
        ("seed", 0),
        ("seed", -(2**63)),
        ("seed", 2**63 - 1),
        ("seed", np.uint64(2**63 - 1)),
        ("max_tokens", 1),
        ("max_tokens", 10**9),
        ("max_tokens", None),
        ("min_tokens", 0),
        ("min_tokens", 16),
        ("logprobs", 0),
        ("logprobs", MAX_LOGPROBS),
        ("logprobs", None),
        ("prompt_logprobs", 0),
        ("prompt_logprobs", MAX_LOGPROBS),
    ],
    ids=repr,
)
def test_valid_integer_values_are_kept_as_python_ints(name: str, value: Any) -> None:
    kept = getattr(SamplingParams(**{name: value}), name)
    if value is None:
        assert kept is None
    else:
        assert type(kept) is int and kept == int(value)


def test_defaults_and_vllm_conventions() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k) == (1, 1.0, 1.0, 0)
    assert params.max_tokens == 16 and params.stop_token_ids == [] and params.stop_strings == []
    assert SamplingParams(top_k=-1).top_k == 0  # -1 is vLLM's "off"
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    assert SamplingParams(stop="x").stop_strings == ["x"]
    assert SamplingParams(stop=("x", "y")).stop_strings == ["x", "y"]  # type: ignore[arg-type]
    ids = SamplingParams(stop_token_ids=(np.int64(7), 0)).stop_token_ids  # type: ignore[arg-type]
    assert ids == [7, 0] and all(type(t) is int for t in ids)
    assert SamplingParams(temperature=0).is_greedy


@pytest.mark.parametrize("tiny", [1e-300, 5e-324, 1e-5, MIN_TEMPERATURE / 2])
def test_a_tiny_temperature_is_raised_to_the_floor(
    tiny: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Logits divided by a temperature this small overflow and sampling returns garbage;
    vLLM raises it to the same floor, with a warning."""
    params = SamplingParams(temperature=tiny)
    assert params.temperature == MIN_TEMPERATURE and not params.is_greedy
    assert "below" in caplog.text
    assert SamplingParams(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE


def test_checks_run_again_on_replace_and_survive_clone() -> None:
    import dataclasses

    params = SamplingParams(temperature=0.5, top_k=-1, seed=3)
    again = dataclasses.replace(params, max_tokens=4)
    assert again.top_k == 0 and again.max_tokens == 4
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(params, temperature=NAN)
    copy = params.clone()
    assert copy == params and copy is not params
