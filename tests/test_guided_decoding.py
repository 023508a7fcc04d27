"""Guided decoding in the engine, on the real demo model: every output fits its schema, regex,
choice or grammar, per sequence in a continuous batch, and bad grammars are refused with the
reason while the engine keeps serving."""

from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest
from llm_core import LLM, GuidedDecodingParams, SamplingParams
from llm_core.engine.llm_engine import RequestError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
SCHEMAS = [
    PERSON,
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {"enum": ["red", "green", "blue"]},
]
PROMPT = "<|im_start|>user\nDescribe a person in JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def llm(default_model_file: pathlib.Path) -> LLM:
    return LLM(str(default_model_file), kv_cache_memory="64MiB", load_progress=False)


def _run(llm: LLM, guided: GuidedDecodingParams, **kwargs: object) -> list[tuple[str, str]]:
    params = SamplingParams(guided_decoding=guided, **{"max_tokens": 96, **kwargs})  # type: ignore[arg-type]
    outputs = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs
    return [(o.text, str(o.finish_reason)) for o in outputs]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "int-array", "flag", "enum"])
def test_json_fits_its_schema_greedy_and_sampled(llm: LLM, schema: dict) -> None:
    for temperature, seed in [(0.0, None), (1.0, 1)]:
        for text, finish in _run(
            llm, GuidedDecodingParams(json=schema), temperature=temperature, seed=seed, n=2
        ):
            assert finish == "stop", (text, finish)
            jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_choice(llm: LLM) -> None:
    # Any keys: the small model may go on past max_tokens (then "length", an unfinished
    # object); what ends is an object. (Whether a sample ends depends on bf16 rounding, which
    # the prefix cache state of earlier tests changes: so no count of finished ones.)
    objects = _run(llm, GuidedDecodingParams(json_object=True), temperature=0.7, seed=1, n=4)
    for text, finish in objects:
        assert text.startswith("{"), text
        assert finish == "length" or isinstance(json.loads(text), dict), (text, finish)
    pattern = r"(\+1 )?[0-9]{3}-[0-9]{4}"
    for text, finish in _run(
        llm, GuidedDecodingParams(regex=pattern), temperature=1.0, seed=6, n=3
    ):
        assert finish == "stop" and re.fullmatch(pattern, text), text
    choices = ["yes", "no", "maybe so"]
    for text, finish in _run(
        llm, GuidedDecodingParams(choice=choices), temperature=1.0, seed=7, n=3
    ):
        assert finish == "stop" and text in choices


@pytest.mark.parametrize(
    "grammar",
    [
        # Lark, then the same language in GBNF
        'start: term (op term)? (op term)?\nop: "+" | "-"\nterm: /[0-9]{1,3}/',
        'root ::= term (op term)? (op term)?\nop ::= "+" | "-"\nterm ::= [0-9] [0-9]? [0-9]?',
    ],
    ids=["lark", "gbnf"],
)
def test_grammar(llm: LLM, grammar: str) -> None:
    for text, finish in _run(
        llm, GuidedDecodingParams(grammar=grammar), temperature=1.0, seed=8, n=4
    ):
        assert finish == "stop" and re.fullmatch(r"[0-9]{1,3}([+-][0-9]{1,3}){0,2}", text), text


def test_guided_and_free_rows_share_a_batch_without_leaking(llm: LLM) -> None:
    """A free sequence decodes the same tokens alone and beside guided ones."""
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([PROMPT], free, use_tqdm=False)[0].outputs[0].token_ids
    guided = SamplingParams(
        temperature=0.8, seed=3, max_tokens=96, guided_decoding=GuidedDecodingParams(json=PERSON)
    )
    outputs = llm.generate([PROMPT, PROMPT, PROMPT], [guided, free, guided], use_tqdm=False)
    assert outputs[1].outputs[0].token_ids == alone
    for out in (outputs[0], outputs[2]):
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)


def test_max_tokens_inside_the_structure_says_length(llm: LLM) -> None:
    [(text, finish)] = _run(llm, GuidedDecodingParams(json=PERSON), temperature=0.0, max_tokens=4)
    assert finish == "length"
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize(
    ("guided", "message"),
    [
        (GuidedDecodingParams(regex="a(b"), "unclosed group"),
        (GuidedDecodingParams(json={"type": "strin"}), "strin"),
        (GuidedDecodingParams(grammar="start: undefined_rule"), "undefined_rule"),
        (GuidedDecodingParams(grammar="root ::= [a-"), "GBNF"),
    ],
    ids=["regex", "schema", "lark", "gbnf"],
)
def test_bad_grammars_are_refused_with_the_reason(
    llm: LLM, guided: GuidedDecodingParams, message: str
) -> None:
    with pytest.raises(RequestError, match=re.escape(message)):
        llm.llm_engine.add_request("bad", PROMPT, SamplingParams(guided_decoding=guided))
    assert not llm.llm_engine.has_unfinished_requests()  # nothing was queued
    [(text, _)] = _run(llm, GuidedDecodingParams(choice=["fine"]))
    assert text == "fine"  # and the engine still serves


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams(json=PERSON, regex="x")
    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecodingParams()
    with pytest.raises(ValueError, match="backend"):
        GuidedDecodingParams(regex="x", backend="xgrammar")
    with pytest.raises(ValueError, match="not valid JSON"):
        GuidedDecodingParams(json="{nope")
    assert GuidedDecodingParams(json='{"type": "integer"}').json == {"type": "integer"}


def test_compiled_grammars_are_cached(llm: LLM) -> None:
    compiler = llm.llm_engine.grammar
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    _run(llm, GuidedDecodingParams(json=schema))
    compiles, hits = compiler.compiles, compiler.hits
    _run(llm, GuidedDecodingParams(json=dict(schema)), n=3)
    assert compiler.compiles == compiles and compiler.hits == hits + 3
