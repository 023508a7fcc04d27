"""Hostile and malformed input to the OpenAI-compatible server, and its OpenAPI document.

Raw httpx requests with hand-written JSON bodies (the ``openai`` client refuses NaN and
cannot send an unknown role): unknown roles, null content, unknown content parts, NaN,
infinities and numbers out of range are each a 400 in OpenAI's error shape that names the
field. Then the document at /openapi.json (request bodies, error answers, /metrics as text,
405 with Allow), and a bounded schemathesis run against that same document: no 5xx and no
answer that breaks the document, on the tiny random-weight server tests/test_server.py builds.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from conftest_loaders import TINY_VOCAB, save_tiny_hf_checkpoint
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from llm_core.entrypoints.openai.middleware import PUBLIC_PATHS
from llm_core.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from pydantic import BaseModel
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import API_KEY, InProcessServer

USER = '{"role": "user", "content": "Hello"}'
#: The bodies of the POST routes, as the document must declare them.
BODIES: dict[str, list[type[BaseModel]]] = {
    "/v1/completions": [CompletionRequest],
    "/v1/chat/completions": [ChatCompletionRequest],
    "/tokenize": [TokenizeCompletionRequest, TokenizeChatRequest],
    "/detokenize": [DetokenizeRequest],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    model = tmp_path_factory.mktemp("hostile") / "tiny-llama"
    save_tiny_hf_checkpoint(model, "llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend
    running = InProcessServer(model)
    try:
        yield running
    finally:
        running.stop()
        torch.set_num_threads(threads)


def _post(server: InProcessServer, path: str, body: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(server.url + path, content=body.encode(), headers=headers, timeout=30)


def _refused(response: httpx.Response, param: str, *words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    for word in (param, *words):
        assert word in error["message"], error


# ----------------------------------------------------------------------------------------------
# messages
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "param", "words"),
    [
        # roles outside OpenAI's set
        (f'[{USER}, {{"role": "wizard", "content": "x"}}]', "messages[1].role", ["wizard"]),
        ('[{"role": "User", "content": "x"}]', "messages[0].role", ["User", "'user'"]),
        ('[{"role": null, "content": "x"}]', "messages[0].role", []),
        ('[{"content": "x"}]', "messages[0].role", ["required"]),
        # null or missing content, where OpenAI does not allow it
        ('[{"role": "user", "content": null}]', "messages[0].content", ["a user message"]),
        (f'[{USER}, {{"role": "system"}}]', "messages[1].content", ["a system message"]),
        ('[{"role": "developer", "content": null}]', "messages[0].content", ["developer"]),
        (
            f'[{USER}, {{"role": "tool", "tool_call_id": "c", "content": null}}]',
            "messages[1].content",
            ["a tool message"],
        ),
        (
            f'[{USER}, {{"role": "assistant", "content": null}}]',
            "messages[1].content",
            ["assistant", "tool_calls"],
        ),
        (
            f'[{USER}, {{"role": "assistant", "content": null, "tool_calls": []}}]',
            "messages[1].content",
            ["assistant"],
        ),
        # content parts of unknown type, or without their text
        (
            '[{"role": "user", "content": [{"type": "video", "text": "x"}]}]',
            "messages[0].content[0].type",
            ["video", "'text'"],
        ),
        (
            '[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]',
            "messages[0].content[1].text",
            ["needs"],
        ),
        ('[{"role": "user", "content": [{"text": "x"}]}]', "messages[0].content[0].type", []),
        ('[{"role": "user", "content": 5}]', "messages[0].content", ["expected one of"]),
        # known but unsupported parts: refused where the conversation is rendered
        (
            '[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
            "messages[0].content[0].type",
            ["only text parts"],
        ),
    ],
)
def test_bad_messages_are_400_naming_the_message(
    server: InProcessServer, messages: str, param: str, words: list[str]
) -> None:
    chat = '{"model": "tiny", "max_tokens": 2, "messages": ' + messages + "}"
    _refused(_post(server, "/v1/chat/completions", chat), param, *words)
    # /tokenize renders messages the same way, so it refuses them the same way
    _refused(_post(server, "/tokenize", '{"messages": ' + messages + "}"), param, *words)


@pytest.mark.parametrize(
    "messages",
    [
        # OpenAI allows null content in an assistant message with tool calls ...
        f'[{USER}, {{"role": "assistant", "content": null, "tool_calls": [{{"id": "c1", '
        f'"type": "function", "function": {{"name": "f", "arguments": "{{}}"}}}}]}}, '
        f'{{"role": "tool", "tool_call_id": "c1", "content": "42"}}]',
        f'[{USER}, {{"role": "assistant", "tool_calls": [{{"id": "c1", "type": "function", '
        f'"function": {{"name": "f", "arguments": {{"x": 1}}}}}}]}}]',
        # ... or with the deprecated function_call, and in a deprecated function message
        f'[{USER}, {{"role": "assistant", "content": null, '
        f'"function_call": {{"name": "f", "arguments": "{{}}"}}}}]',
        f'[{USER}, {{"role": "function", "name": "f", "content": null}}]',
        # every role of OpenAI's, and text parts
        '[{"role": "developer", "content": "Be terse."}, {"role": "system", "content": "Hi"}, '
        '{"role": "user", "content": [{"type": "text", "text": "a"}]}, '
        '{"role": "assistant", "content": [{"type": "text", "text": "b"}]}]',
    ],
)
def test_messages_openai_allows_are_accepted(server: InProcessServer, messages: str) -> None:
    response = _post(server, "/tokenize", '{"messages": ' + messages + "}")
    assert response.status_code == 200, response.text
    assert response.json()["count"] > 0


# ----------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------

#: (field, JSON literal, words in the message); 1e309 and friends parse as infinities.
BAD_NUMBERS = [
    ("temperature", "NaN", "finite"),
    ("temperature", "Infinity", "finite"),
    ("temperature", "1e309", "finite"),
    ("temperature", "-1", "temperature must be >= 0"),
    ("top_p", "-Infinity", "finite"),
    ("top_p", "0", "top_p must be in (0, 1]"),
    ("top_p", "1.0000001", "top_p must be in (0, 1]"),
    ("min_p", "NaN", "finite"),
    ("min_p", "1.5", "min_p must be in [0, 1]"),
    ("presence_penalty", "1e309", "finite"),
    ("presence_penalty", "2.5", "presence_penalty must be in [-2, 2]"),
    ("frequency_penalty", "-1e400", "finite"),
    ("frequency_penalty", "-3", "frequency_penalty must be in [-2, 2]"),
    ("repetition_penalty", "NaN", "finite"),
    ("repetition_penalty", "0", "repetition_penalty must be > 0"),
    ("top_k", "-2", "top_k must be in [-1, 2147483647]"),
    ("top_k", "1e309", "valid integer"),
    ("top_k", "2.5", "valid integer"),
    ("seed", "NaN", "valid integer"),
    ("seed", "9223372036854775808", "seed must be in [-9223372036854775808"),
    ("n", "1e309", "valid integer"),
    ("n", "129", "n must be in [1, 128]"),
    ("max_tokens", "0", "max_tokens must be >= 1"),
    ("max_tokens", "Infinity", "valid integer"),
    ("min_tokens", "-1", "min_tokens must be in [0, 2147483647]"),
    ("prompt_logprobs", "21", "prompt_logprobs must be in [0, 20]"),
    ("logit_bias", '{"5": NaN}', "finite"),
    ("logit_bias", '{"5": 101}', "less than or equal to 100"),
    ("stop_token_ids", "[1, -1]", "greater than or equal to 0"),
]


@pytest.mark.parametrize(("field", "literal", "words"), BAD_NUMBERS)
def test_bad_numbers_are_400_naming_the_field_on_both_endpoints(
    server: InProcessServer, field: str, literal: str, words: str
) -> None:
    completion = '{"model": "tiny", "prompt": "x", "max_tokens": 1, "%s": %s}'
    chat = '{"model": "tiny", "max_tokens": 1, "messages": [%s], "%s": %s}'
    for response in (
        _post(server, "/v1/completions", completion % (field, literal)),
        _post(server, "/v1/chat/completions", chat % (USER, field, literal)),
    ):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"].startswith(field) and error["code"] == "invalid_value", error
        assert words in error["message"], error


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "x", "logprobs": NaN}', "logprobs"),
        ("/v1/completions", '{"prompt": "x", "logprobs": 21}', "logprobs"),
        ("/v1/completions", '{"prompt": "x", "best_of": 0}', "best_of"),
        ("/v1/completions", '{"prompt": [1, 1e309]}', "prompt"),
        (
            "/v1/chat/completions",
            f'{{"messages": [{USER}], "logprobs": true, "top_logprobs": 21}}',
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            f'{{"messages": [{USER}], "max_completion_tokens": -Infinity}}',
            "max_completion_tokens",
        ),
        ("/detokenize", '{"tokens": [1, NaN]}', "tokens[1]"),
    ],
)
def test_more_bad_numbers(server: InProcessServer, path: str, body: str, param: str) -> None:
    response = _post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error


def test_valid_edge_numbers_are_served(server: InProcessServer) -> None:
    """The ends of each range are allowed; integers are valid floats, and numbers with no
    fraction valid integers (JSON has one number type)."""
    body = {
        "model": "tiny", "prompt": "Hello", "max_tokens": 2, "temperature": 0, "top_p": 1,
        "min_p": 1.0, "top_k": -1, "presence_penalty": -2, "frequency_penalty": 2,
        "repetition_penalty": 1e-3, "seed": -(2**63), "logprobs": 20.0, "n": 2.0,
    }  # fmt: skip
    response = _post(server, "/v1/completions", json.dumps(body))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


# ----------------------------------------------------------------------------------------------
# the OpenAPI document
# ----------------------------------------------------------------------------------------------


def _document(server: InProcessServer) -> dict[str, Any]:
    response = httpx.get(server.url + "/openapi.json", timeout=10)  # public: no key
    assert response.status_code == 200, response.text
    return dict(response.json())


def _keys(schema: Any) -> set[str]:
    keys: set[str] = set()
    if isinstance(schema, list):
        keys.update(*map(_keys, schema))
    elif isinstance(schema, dict):
        keys.update(schema, *map(_keys, schema.values()))
    return keys


def _values(schema: Any, key: str) -> list[Any]:
    """Every value of ``key`` anywhere in ``schema``."""
    if isinstance(schema, list):
        return [v for item in schema for v in _values(item, key)]
    if isinstance(schema, dict):
        found = [schema[key]] if key in schema else []
        return found + [v for item in schema.values() for v in _values(item, key)]
    return []


def test_openapi_declares_every_body_and_error(server: InProcessServer) -> None:
    document = _document(server)
    schemas = document["components"]["schemas"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "422" not in answers, (method, path)  # invalid input is 400, as OpenAI's
            assert {"200", "500"} <= set(answers), (method, path)
            for status, answer in answers.items():
                if status != "200":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
            locked = path not in PUBLIC_PATHS
            assert ("401" in answers) == locked == ("security" in operation), (method, path)
            if locked:
                assert answers["401"]["headers"]["WWW-Authenticate"]["required"]
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    posts = {path: ops["post"] for path, ops in document["paths"].items() if "post" in ops}
    assert set(posts) == set(BODIES)
    for path, operation in posts.items():
        assert {"400", "401", "404", "413"} <= set(operation["responses"]), path
        body = operation["requestBody"]
        assert body["required"]
        schema = body["content"]["application/json"]["schema"]
        refs = [s["$ref"] for s in schema.get("anyOf", [schema])]
        assert refs == [f"#/components/schemas/{m.__name__}" for m in BODIES[path]]
        for model in BODIES[path]:
            # the very schema of the model that validates the body
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in own.pop("$defs", {}).items():
                assert schemas[name] == sub, name
            assert schemas[model.__name__] == own
    for path, chunk in (
        ("/v1/completions", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionChunk"),
    ):
        answers = posts[path]["responses"]
        assert "503" in answers and answers["503"]["headers"]["Retry-After"]
        content = answers["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        # each event's data: a chunk (or an error) as JSON, or the closing [DONE]
        event = content["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
        assert event[0] == {"const": "[DONE]"}
        assert _values(event[1]["contentSchema"], "$ref") == [
            f"#/components/schemas/{chunk}",
            "#/components/schemas/ErrorResponse",
        ]
    # every reference resolves; bounds are JSON Schema's keywords (pydantic writes its own "ge"
    # where it cannot)
    for ref in _values(document, "$ref"):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for name, schema in schemas.items():
        assert not {"ge", "gt", "le", "lt"} & _keys(schema), name
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["temperature"]["anyOf"][0] == {"minimum": 0, "type": "number"}
    assert chat["top_p"]["anyOf"][0] == {"exclusiveMinimum": 0, "maximum": 1, "type": "number"}
    assert schemas["ChatMessage"]["properties"]["role"]["enum"] == [
        "system", "developer", "user", "assistant", "tool", "function",
    ]  # fmt: skip


def test_metrics_are_text_and_405_says_allow(server: InProcessServer) -> None:
    declared = _document(server)["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(declared) == {"text/plain"}
    metrics = httpx.get(server.url + "/metrics", timeout=10)
    assert metrics.headers["content-type"].startswith("text/plain")
    for method, path, allowed in [
        ("GET", "/v1/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("POST", "/health", "GET"),
        ("DELETE", "/v1/models", "GET"),
    ]:
        response = httpx.request(
            method, server.url + path, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allowed
        error = response.json()["error"]
        assert error["code"] == "method_not_allowed" and allowed in error["message"]


# ----------------------------------------------------------------------------------------------
# schemathesis
# ----------------------------------------------------------------------------------------------

#: Examples per operation and generation mode: about a minute in all on the tiny server.
MAX_EXAMPLES = 100
SEED = 20240601
#: What each answer is checked for; negative cases (bodies the document forbids) must be 4xx.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _steer(path: str, body: Any, options: dict[str, bool]) -> None:
    """Steer a generated body toward requests the server serves, with little work: the served
    model (the document allows any name), at most a few tokens, choices and prompts, token ids
    in the vocabulary, and none of the fields refused whatever their value. Without this most
    cases would be 400s, and the answers of the generation itself would go unchecked. The
    generator leaves most optional fields out, so ``options`` (drawn) asks for streaming and
    log-probabilities where the body does not say."""
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = "tiny"
    for field, most in (("max_tokens", 4), ("max_completion_tokens", 4), ("n", 2)):
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > most:
            body[field] = most
    for field in ("suffix", "logit_bias", "chat_template", "best_of"):
        body.pop(field, None)
    for field in ("prompt", "tokens"):
        if isinstance(body.get(field), list):
            body[field] = [_in_vocab(item) for item in body[field][:2]]
    if path == "/v1/completions":
        body.setdefault("stream", options["stream"])
        if options["logprobs"]:
            body.setdefault("logprobs", 2)
            body.setdefault("echo", options["echo"])
    elif path == "/v1/chat/completions":
        if body.get("max_tokens") is None:
            body["max_tokens"] = 4  # chat's default is the rest of the context
        body.setdefault("stream", options["stream"])
        if options["logprobs"]:
            body.setdefault("logprobs", True)
            body.setdefault("top_logprobs", 2)


def _in_vocab(item: Any) -> Any:
    if isinstance(item, list):
        return [_in_vocab(t) for t in item]
    return item % TINY_VOCAB if type(item) is int else item


def _fuzz(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    auth: dict[str, str],
    statuses: collections.Counter[tuple[str, str, int]],
) -> None:
    """``MAX_EXAMPLES`` cases of ``operation``, each sent and its answer checked."""
    checks = CHECKS + ([negative_data_rejection] if mode.is_negative else [])
    generates = operation.path in ("/v1/completions", "/v1/chat/completions")
    options = st.fixed_dictionaries(dict.fromkeys(("stream", "logprobs", "echo"), st.booleans()))

    @seed(SEED)
    @settings(
        max_examples=MAX_EXAMPLES,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # report a failure as found, unshrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(mode, headers=auth),
        options=options if generates else st.just({}),
    )
    def run(case: schemathesis.Case, options: dict[str, bool]) -> None:
        if mode.is_positive:
            _steer(operation.path, case.body, options)
        response = case.call(timeout=60)
        case.validate_response(response, checks=checks, headers=auth)
        statuses[(operation.label, mode.value, response.status_code)] += 1

    run()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    server: InProcessServer,
) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    statuses: collections.Counter[tuple[str, str, int]] = collections.Counter()
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) == 8
    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE, auth, statuses)
        if operation.method.upper() == "POST":  # the GET routes take no input to break
            _fuzz(operation, GenerationMode.NEGATIVE, auth, statuses)
    report = "\n".join(
        f"{label} [{mode}] {status}: {n}" for (label, mode, status), n in sorted(statuses.items())
    )
    print(report)
    assert not any(status >= 500 for _, _, status in statuses), report
    # the endpoints did their work: some positive cases were served
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert statuses[(f"POST {path}", "positive", 200)] > 0, report
