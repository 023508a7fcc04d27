"""Structured output and tool calling through the OpenAI-compatible server, as OpenAI's and
vLLM's clients use them: real HTTP servers on 127.0.0.1 serving the SmolLM2 demo model, driven
with the official ``openai`` client; and the tool-call and reasoning parsers on literal model
outputs, whole and streamed in fragments.

One engine serves two apps for the whole module:

- ``server``: a Hermes / Qwen-style chat template that renders tools and ``<tool_call>``
  (so the hermes tool-call parser is detected) and ``--reasoning-parser qwen3``;
- ``plain``: the model's own template, which shows no call format (tool_choice "auto" is
  refused there) and no reasoning.

The demo model is small and not smart: where a test needs the model to write a particular
shape (a Hermes tool call, a ``<think>`` block), guided decoding makes it, and the tests check
validity, not quality.
"""

from __future__ import annotations

import json
import pathlib
import random
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
import uvicorn
from llm_core.cli import build_parser
from llm_core.config import EngineArgs
from llm_core.engine.async_llm import AsyncLLM
from llm_core.engine.llm_engine import LLMEngine
from llm_core.entrypoints.openai import ServerConfig, create_app
from llm_core.entrypoints.openai.message_parser import MessageParser
from llm_core.entrypoints.openai.protocol import DeltaMessage
from llm_core.entrypoints.openai.reasoning import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    detect_reasoning_parser,
)
from llm_core.entrypoints.openai.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedCallParser,
    RequiredCallsParser,
    ToolParser,
    detect_tool_parser,
)
from pydantic import BaseModel, Field
from test_server import Server

API_KEY = "structured-key"

#: A Qwen 2.5-style template: tools in the system turn, calls in <tool_call> tags, results in
#: <tool_response> tags.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You can call functions. Their signatures are within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call, return a JSON object with the function name and arguments within \
<tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 12}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone",
            "parameters": TIME_PARAMETERS,
        },
    },
]
SCHEMA_OF = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ASK_WEATHER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}

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
        "properties": {"ok": {"type": "boolean"}, "stars": {"type": "integer", "maximum": 5}},
        "required": ["ok", "stars"],
        "additionalProperties": False,
    },
    {"enum": ["red", "green", "blue"]},
    {
        "type": "object",
        "properties": {"pet": {"$ref": "#/$defs/pet"}},
        "required": ["pet"],
        "additionalProperties": False,
        "$defs": {
            "pet": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer"}},
                "required": ["kind", "legs"],
                "additionalProperties": False,
            }
        },
    },
]


class Served(Server):
    """create_app(llm, config) served by uvicorn in a thread of the test process."""

    def __init__(self, llm: AsyncLLM, config: ServerConfig):
        super().__init__()
        self.config = config
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                create_app(llm, config), host="127.0.0.1", port=self.port, log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def servers(default_model_file: pathlib.Path) -> Iterator[tuple[Served, Served]]:
    args = EngineArgs(
        model=str(default_model_file), kv_cache_memory="64MiB", max_num_seqs=16,
        load_progress=False,
    )  # fmt: skip
    llm = AsyncLLM(LLMEngine(args), max_pending=64)
    hermes = ServerConfig(
        model_name="smol", api_key=API_KEY, chat_template=HERMES_TEMPLATE, reasoning_parser="qwen3"
    )
    served = Served(llm, hermes)
    plain = Served(llm, ServerConfig(model_name="smol", api_key=API_KEY))
    try:
        yield served, plain
    finally:
        plain.stop()
        served.stop()


@pytest.fixture(scope="module")
def server(servers: tuple[Served, Served]) -> Served:
    return servers[0]


@pytest.fixture(scope="module")
def plain(servers: tuple[Served, Served]) -> Served:
    return servers[1]


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return server.client()


def _chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs = {"model": "smol", "messages": ASK_WEATHER, "temperature": 0, **kwargs}
    return client.chat.completions.create(**kwargs)


# ----------------------------------------------------------------------------------------------
# structured output
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "ints", "flags", "enum", "refs"])
def test_json_schema_response_format(client: openai.OpenAI, schema: dict[str, Any]) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    messages = [{"role": "user", "content": "Answer in JSON."}]
    # Flexible whitespace lets this small model write blank lines until max_tokens: allow
    # one space between tokens (vLLM's guided_whitespace_pattern).
    compact = {"guided_whitespace_pattern": " ?"}
    whole = _chat(
        client, messages=messages, response_format=response_format, max_tokens=96,
        extra_body=compact,
    )  # fmt: skip
    choice = whole.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)
    # the same through vLLM's guided_json, streamed, and sampled
    streamed = _chat(
        client, messages=messages, max_tokens=96, stream=True,
        extra_body={"guided_json": schema, **compact},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content
    sampled = _chat(
        client, messages=messages, response_format=response_format, max_tokens=96,
        temperature=1.0, seed=3, n=2, extra_body=compact,
    )  # fmt: skip
    for c in sampled.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    size: Literal["small", "medium", "large"]
    founded: int = Field(ge=0, le=2100)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model="smol",
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=96,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City), completion
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_on_chat_and_completions(client: openai.OpenAI) -> None:
    chat = _chat(client, response_format={"type": "json_object"}, max_tokens=128, seed=1)
    choice = chat.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # the model may ramble past max_tokens; then it says so
        assert choice.finish_reason == "length"
    # Four tokens cannot hold a person (compact "{}" would fit an empty json_object).
    person: Any = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    short = _chat(client, response_format=person, max_tokens=4)
    assert short.choices[0].finish_reason == "length"
    completion = client.completions.create(
        model="smol", prompt="A JSON object with a name and an age:", max_tokens=64,
        temperature=0, extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": PERSON}}},
    )  # fmt: skip
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)
    text = _chat(client, response_format={"type": "text"}, max_tokens=8)
    assert text.choices[0].message.content


def test_guided_regex_choice_and_grammar(client: openai.OpenAI) -> None:
    kwargs: Any = {"model": "smol", "max_tokens": 32, "temperature": 1.0, "seed": 5, "n": 2}

    def chat(**extra: Any) -> list[tuple[str, str]]:
        messages: Any = [{"role": "user", "content": "Give me a phone number."}]
        result = client.chat.completions.create(messages=messages, **kwargs, extra_body=extra)
        return [(c.message.content or "", c.finish_reason) for c in result.choices]

    def complete(**extra: Any) -> list[tuple[str, str]]:
        result = client.completions.create(prompt="Phone:", **kwargs, extra_body=extra)
        return [(c.text, c.finish_reason) for c in result.choices]

    pattern = r"[0-9]{3}-[0-9]{4}"
    choices = ["yes", "no", "maybe so"]
    grammar = 'start: term | term op term\nop: "+" | "-"\nterm: /[0-9]{1,3}/'
    for run in (chat, complete):
        for text, finish in run(guided_regex=pattern, guided_decoding_backend="guidance"):
            assert finish == "stop" and re.fullmatch(pattern, text), text
        for text, finish in run(guided_choice=choices):
            assert finish == "stop" and text in choices, text
        for text, finish in run(guided_grammar=grammar):
            assert finish == "stop" and re.fullmatch(r"[0-9]{1,3}([+-][0-9]{1,3})?", text), text


# ----------------------------------------------------------------------------------------------
# tool calling
# ----------------------------------------------------------------------------------------------


class GetWeather(BaseModel):
    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


def test_named_tool_call(client: openai.OpenAI) -> None:
    result = _chat(client, tools=TOOLS, tool_choice=WEATHER, max_tokens=64)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    # the client's own helpers: strict pydantic tools, arguments parsed into the model
    parsed = client.beta.chat.completions.parse(
        model="smol", messages=ASK_WEATHER, temperature=0, max_tokens=64,
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
    )  # fmt: skip
    [parsed_call] = parsed.choices[0].message.tool_calls or []
    assert isinstance(parsed_call.function.parsed_arguments, GetWeather)


def test_required_tool_calls(client: openai.OpenAI) -> None:
    one = _chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                max_tokens=64)  # fmt: skip
    assert one.choices[0].finish_reason == "tool_calls"
    [call] = one.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    several = _chat(client, tools=TOOLS, tool_choice="required", max_tokens=160)
    assert several.choices[0].finish_reason == "tool_calls"
    calls = several.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def _hermes_grammar(prefix: str) -> str:
    """Lark for ``prefix`` then one Hermes call of get_weather: makes the model write the
    format the server's auto tool parser reads."""
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_PARAMETERS},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    start = f'start: {json.dumps(prefix)} "<tool_call>" call "</tool_call>"'
    return f"{start}\ncall: %json {json.dumps(call)}"


def test_auto_tool_call_whole_and_streamed(client: openai.OpenAI) -> None:
    extra = {"guided_grammar": _hermes_grammar("Let me check.\n")}
    whole = _chat(client, tools=TOOLS, max_tokens=80, extra_body=extra)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)

    chunks = list(_chat(client, tools=TOOLS, max_tokens=80, extra_body=extra, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    firsts = [d.tool_calls[0] for d in deltas if d.tool_calls and d.tool_calls[0].id]
    assert len(firsts) == 1 and firsts[0].index == 0 and firsts[0].type == "function"
    assert firsts[0].function.name == "get_weather" and firsts[0].function.arguments == ""
    fragments = [d.tool_calls[0].function.arguments for d in deltas if d.tool_calls][1:]
    assert len(fragments) > 1 and all(fragments)
    assert "".join(fragments) == call.function.arguments
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the client's stream helper reassembles the same message
    with client.chat.completions.stream(
        model="smol", messages=ASK_WEATHER, temperature=0, tools=TOOLS, max_tokens=80,
        extra_body=extra,
    ) as stream:  # fmt: skip
        events = [event.type for event in stream]
        final = stream.get_final_completion().choices[0]
    assert "tool_calls.function.arguments.done" in events
    assert final.finish_reason == "tool_calls" and final.message.content == "Let me check."
    [streamed_call] = final.message.tool_calls or []
    assert streamed_call.function.name == "get_weather"
    assert streamed_call.function.arguments == call.function.arguments


def test_forced_tool_calls_streamed(client: openai.OpenAI) -> None:
    choices: list[Any] = [WEATHER, "required"]
    for choice in choices:
        whole = _chat(client, tools=TOOLS, tool_choice=choice, max_tokens=160).choices[0]
        with client.chat.completions.stream(
            model="smol", messages=ASK_WEATHER, temperature=0, tools=TOOLS, tool_choice=choice,
            max_tokens=160,
        ) as stream:  # fmt: skip
            final = stream.get_final_completion().choices[0]
        assert final.finish_reason == whole.finish_reason == "tool_calls"
        got = [(c.function.name, c.function.arguments) for c in final.message.tool_calls or []]
        want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert got == want


def test_tool_call_round_trip(server: Served, client: openai.OpenAI) -> None:
    first = _chat(client, tools=TOOLS, tool_choice=WEATHER, max_tokens=64).choices[0].message
    [call] = first.tool_calls
    result = '{"temperature": 21, "sky": "sunny"}'
    messages = [
        *ASK_WEATHER,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = _chat(client, messages=messages, tools=TOOLS, max_tokens=24).choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert answer.message.content and not answer.message.tool_calls
    # the template saw the call (its arguments as an object) and the result
    ids = server.post("/tokenize", {"messages": messages, "tools": TOOLS}).json()["tokens"]
    prompt = server.post("/detokenize", {"tokens": ids}).json()["prompt"]
    arguments = json.dumps(json.loads(call.function.arguments))
    assert f'{{"name": "get_weather", "arguments": {arguments}}}' in prompt
    assert f"<tool_response>\n{result}\n</tool_response>" in prompt
    assert '"name": "get_time"' in prompt  # the tools, in the system turn


def test_tool_choice_none_and_no_parser(plain: Served, client: openai.OpenAI) -> None:
    none = _chat(client, tools=TOOLS, tool_choice="none", max_tokens=8).choices[0]
    assert none.message.content and not none.message.tool_calls
    with pytest.raises(openai.BadRequestError, match="tool-call parser"):
        _chat(plain.client(), tools=TOOLS, max_tokens=8)
    # forcing calls needs no parser: guided decoding writes them
    forced = _chat(plain.client(), tools=TOOLS, tool_choice=WEATHER, max_tokens=64).choices[0]
    assert forced.finish_reason == "tool_calls"


def test_max_tokens_inside_the_structure_says_length(client: openai.OpenAI) -> None:
    schema_format: Any = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    assert _chat(client, response_format=schema_format, max_tokens=5).choices[0].finish_reason == (
        "length"
    )
    named = _chat(client, tools=TOOLS, tool_choice=WEATHER, max_tokens=5).choices[0]
    assert named.finish_reason == "length"
    streamed = list(_chat(client, tools=TOOLS, tool_choice="required", max_tokens=5, stream=True))
    assert streamed[-1].choices[0].finish_reason == "length"
    # an auto call cut short stays text
    extra = {"guided_grammar": _hermes_grammar("")}
    auto = _chat(client, tools=TOOLS, max_tokens=12, extra_body=extra).choices[0]
    assert auto.finish_reason == "length" and not auto.message.tool_calls
    assert auto.message.content.startswith("<tool_call>")


# ----------------------------------------------------------------------------------------------
# reasoning
# ----------------------------------------------------------------------------------------------


def test_reasoning_split_whole_and_streamed(server: Served, plain: Served) -> None:
    extra = {"guided_regex": r"<think>[a-z ]{3,30}</think>\n\n[A-Z][a-z ]{3,30}\."}
    whole = _chat(server.client(), max_tokens=64, extra_body=extra).choices[0]
    reasoning = whole.message.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    assert re.fullmatch(r"[A-Z][a-z ]{3,30}\.", whole.message.content)
    chunks = list(_chat(server.client(), max_tokens=64, extra_body=extra, stream=True))
    deltas = [c.choices[0].delta.model_extra or {} for c in chunks]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == whole.message.content
    # without a reasoning parser the text is left alone; answers without <think> are content
    raw = _chat(plain.client(), max_tokens=64, extra_body=extra).choices[0].message
    assert raw.content.startswith("<think>") and "reasoning_content" not in (raw.model_extra or {})
    answer = server.post(
        "/v1/chat/completions", {"messages": ASK_WEATHER, "max_tokens": 6, "temperature": 0}
    ).json()["choices"][0]["message"]
    assert set(answer) == {"role", "content"} and answer["content"]


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
        "response_format", "Invalid type",
    ),
    ({"response_format": {"type": "xml"}}, "response_format", "not supported"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "(abc"}, "guided_regex", "unclosed group"),
    ({"guided_grammar": "start: foo bar"}, "guided_grammar", "unknown name"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "give only one"),
    ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend",
     "llguidance"),
    ({"guided_whitespace_pattern": " ", "guided_regex": "a"}, "guided_whitespace_pattern", "JSON"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": WEATHER}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'required'"),
    ({"tools": TOOLS, "tool_choice": WEATHER, "response_format": {"type": "json_object"}},
     "tool_choice", "cannot also follow response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}],
      "tool_choice": "required"}, "tools", "Invalid type"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "more than once"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "function"),
]  # fmt: skip


def test_bad_requests_are_400_while_others_are_served(server: Served, plain: Served) -> None:
    def good() -> dict[str, Any]:
        body = {"messages": ASK_WEATHER, "max_tokens": 40, "ignore_eos": True,
                "response_format": {"type": "json_object"}, "temperature": 0}  # fmt: skip
        return server.post("/v1/chat/completions", body).json()

    def bad(case: tuple[dict[str, Any], str, str]) -> httpx.Response:
        return server.post("/v1/chat/completions", {"messages": ASK_WEATHER, **case[0]})

    with ThreadPoolExecutor(4) as pool:
        running = pool.submit(good)
        responses = list(pool.map(bad, BAD_REQUESTS))
        auto_without_parser = plain.post(
            "/v1/chat/completions", {"messages": ASK_WEATHER, "tools": TOOLS}
        )
        completion = server.post("/v1/completions", {"prompt": "x", "guided_regex": "(abc"})
        answer = running.result(timeout=300)
    for (_, param, words), response in zip(BAD_REQUESTS, responses, strict=True):
        assert response.status_code == 400, (param, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param and words in error["message"], error
    assert auto_without_parser.status_code == 400
    assert "--tool-call-parser" in auto_without_parser.json()["error"]["message"]
    assert completion.status_code == 400 and completion.json()["error"]["param"] == "guided_regex"
    assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_serve_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import llm_core.entrypoints.openai.api_server as api_server

    seen: list[ServerConfig] = []
    monkeypatch.setattr(api_server, "run_server", lambda engine, config, **kw: seen.append(config))
    args = build_parser().parse_args(
        ["serve", "--tool-call-parser", "mistral", "--reasoning-parser", "deepseek_r1",
         "--enable-auto-tool-choice"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert (seen[0].tool_call_parser, seen[0].reasoning_parser) == ("mistral", "deepseek_r1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tool-call-parser", "nope"])
    with pytest.raises(ValueError, match="hermes"):
        ServerConfig(model_name="m", tool_call_parser="nope")


# ----------------------------------------------------------------------------------------------
# the parsers, on literal model outputs
# ----------------------------------------------------------------------------------------------

NAMES = ["get_weather", "get_time"]


def _reassemble(deltas: list[DeltaMessage]) -> dict[str, Any]:
    """Stream deltas added up the way OpenAI's client does."""
    reasoning, content = "", ""
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        reasoning += delta.reasoning_content or ""
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id is not None:
                assert piece.index not in calls and piece.function.arguments == ""
                assert piece.type == "function" and piece.function.name
                calls[piece.index] = {"name": piece.function.name, "arguments": ""}
            else:
                assert piece.function.name is None
            calls[piece.index]["arguments"] += piece.function.arguments or ""
    return {
        "reasoning": reasoning or None,
        "content": content,
        "calls": [(c["name"], c["arguments"]) for _, c in sorted(calls.items())],
    }


def _check_whole_and_streamed(
    make: Any, text: str, finish: str = "stop", seed: int = 0
) -> dict[str, Any]:
    """Parse ``text`` whole, and streamed one character at a time and in random fragments:
    the streams must add up to the whole message."""
    message, reason = make().message(text, finish)
    whole = {
        "reasoning": message.reasoning_content,
        "content": message.content or "",
        "calls": [(c.function.name, c.function.arguments) for c in message.tool_calls or []],
        "finish": reason,
    }
    rng = random.Random(seed)
    for cuts in (range(1, len(text)), sorted(rng.sample(range(1, len(text)), len(text) // 4))):
        parser: MessageParser = make()
        deltas: list[DeltaMessage] = []
        for cut in [*cuts, len(text)]:
            deltas += parser.deltas(text[:cut], cut == len(text))
        streamed = {**_reassemble(deltas), "finish": parser.stream_finish_reason(finish)}
        assert streamed == whole, (text, cuts)
    return whole


def _auto(parser: type[ToolParser], reasoning: Any = None) -> Any:
    return lambda: MessageParser(reasoning() if reasoning else None, parser(NAMES))


PARSER_CASES = [
    # (parser, model output, content, [(name, arguments)])
    (
        HermesToolParser,
        'I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"zone": "CET"}}\n</tool_call>',
        "I will look it up.",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"zone": "CET"}')],
    ),
    (
        HermesToolParser,
        '<tool_call>{"arguments": {"q": "a \\"quoted\\" }{ text", "n": [1, -2.5e3, true, null]}, '
        '"name": "get_weather"}</tool_call>',
        "",
        [("get_weather", '{"q": "a \\"quoted\\" }{ text", "n": [1, -2.5e3, true, null]}')],
    ),
    (HermesToolParser, "No tools needed: 2 + 2 = 4.  ", "No tools needed: 2 + 2 = 4.  ", []),
    (
        HermesToolParser,
        "Use <tool_call> tags to call tools.",
        "Use <tool_call> tags to call tools.",
        [],
    ),
    (
        Llama3JsonToolParser,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", "unit": '
        '"fahrenheit"}}',
        "",
        [("get_weather", '{"city": "Rome", "unit": "fahrenheit"}')],
    ),
    (
        Llama3JsonToolParser,
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"zone": "UTC"}}',
        "",
        [("get_weather", '{"city": "Oslo", "unit": "celsius"}'), ("get_time", '{"zone": "UTC"}')],
    ),
    (Llama3JsonToolParser, '{"name": "Ada", "born": 1815}', '{"name": "Ada", "born": 1815}', []),
    (Llama3JsonToolParser, "It is sunny in Oslo.", "It is sunny in Oslo.", []),
    (
        MistralToolParser,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}]',
        "",
        [("get_weather", '{"city": "Lyon", "unit": "celsius"}'), ("get_time", '{"zone": "CET"}')],
    ),
    (
        MistralToolParser,
        ' [{"name": "get_time", "arguments": {"zone": "PST"}}]',
        "",
        [("get_time", '{"zone": "PST"}')],
    ),
    (MistralToolParser, "[1, 2, 3] are numbers.", "[1, 2, 3] are numbers.", []),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), PARSER_CASES)
def test_tool_parsers_whole_and_streamed(
    parser: type[ToolParser], text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    whole = _check_whole_and_streamed(_auto(parser), text)
    assert whole["content"] == content and whole["calls"] == calls
    assert whole["finish"] == ("tool_calls" if calls else "stop")
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


def test_broken_or_cut_calls_stay_text() -> None:
    for text in (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut by max_tokens
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "get_weather" "arguments": {}}</tool_call>',  # not JSON
    ):
        message, finish = _auto(HermesToolParser)().message(text, "length")
        assert (message.content, message.tool_calls, finish) == (text, None, "length")
    # a call cut short while streaming: what was sent stays, the finish reason is the engine's
    parser = _auto(HermesToolParser)()
    deltas = parser.deltas('Hi <tool_call>{"name": "get_weather", "arguments": {"ci', True)
    assert _reassemble(deltas)["calls"] == [("get_weather", '{"ci')]
    assert parser.stream_finish_reason("length") == "length"


def test_forced_call_parsers() -> None:
    named = _check_whole_and_streamed(
        lambda: MessageParser(None, NamedCallParser("get_weather"), forced=True),
        '{\n  "city": "Nice",\n  "unit": "celsius"\n}',
    )
    assert named["calls"] == [("get_weather", '{\n  "city": "Nice",\n  "unit": "celsius"\n}')]
    assert named["content"] == "" and named["finish"] == "tool_calls"
    text = (
        '[{"name": "get_time", "parameters": {"zone": "UTC"}}, '
        '{"name": "get_weather", "parameters": {"city": "Bern", "unit": "celsius"}}]'
    )
    required = _check_whole_and_streamed(
        lambda: MessageParser(None, RequiredCallsParser(NAMES), forced=True), text
    )
    assert [name for name, _ in required["calls"]] == ["get_time", "get_weather"]
    one = _check_whole_and_streamed(
        lambda: MessageParser(None, RequiredCallsParser(NAMES), forced=True, max_calls=1), text
    )
    assert one["calls"] == required["calls"][:1]
    # cut by max_tokens: the call so far, and "length"
    cut = _check_whole_and_streamed(
        lambda: MessageParser(None, NamedCallParser("get_weather"), forced=True),
        '{"city": "Ni',
        finish="length",
    )
    assert cut["calls"] == [("get_weather", '{"city": "Ni')] and cut["finish"] == "length"
    assert len(MistralToolParser().new_call_id()) == 9


@pytest.mark.parametrize(
    ("parser", "prompt", "text", "reasoning", "content"),
    [
        (Qwen3ReasoningParser, "", "<think>\nLet me see.\n</think>\n\nIt is 4.", "\nLet me see.\n",
         "It is 4."),
        (Qwen3ReasoningParser, "", "It is 4.", None, "It is 4."),
        (Qwen3ReasoningParser, "", "<think>cut short by max_tok", "cut short by max_tok", ""),
        (Qwen3ReasoningParser, "<|im_start|>assistant\n<think>\n", "Hmm.</think>Four.", "Hmm.",
         "Four."),
        (DeepSeekR1ReasoningParser, "", "Hmm, 2 + 2.</think>\n\nFour.", "Hmm, 2 + 2.", "Four."),
        (DeepSeekR1ReasoningParser, "", "<think>Hmm.</think>Four.", "Hmm.", "Four."),
        (DeepSeekR1ReasoningParser, "<think>\n\n</think>\n\n", "Four.", None, "Four."),
    ],
)  # fmt: skip
def test_reasoning_parsers(
    parser: Any, prompt: str, text: str, reasoning: str | None, content: str
) -> None:
    whole = _check_whole_and_streamed(lambda: MessageParser(parser(prompt)), text)
    assert (whole["reasoning"], whole["content"]) == (reasoning, content)


def test_reasoning_then_tool_call() -> None:
    text = (
        "<think>The user wants weather.</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    )
    whole = _check_whole_and_streamed(_auto(HermesToolParser, Qwen3ReasoningParser), text)
    assert whole["reasoning"] == "The user wants weather."
    assert whole["content"] == "" and whole["finish"] == "tool_calls"
    assert whole["calls"] == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]


def test_parsers_detected_from_chat_templates() -> None:
    qwen3 = "{%- if tools %}<tools>...</tools><tool_call>...{%- endif %}<think>\n\n</think>"
    assert detect_tool_parser(qwen3) is HermesToolParser
    assert detect_reasoning_parser(qwen3) is Qwen3ReasoningParser
    llama31 = "{{- '<|python_tag|>' + tool_call.name }}<|eom_id|>"
    assert detect_tool_parser(llama31) is Llama3JsonToolParser
    llama32 = (
        'Respond in the format {"name": function name, "parameters": dictionary of argument '
        "name and its value}."
    )
    assert detect_tool_parser(llama32) is Llama3JsonToolParser
    mistral = "{{- '[TOOL_CALLS][' }}{%- for tool_call in message.tool_calls %}"
    assert detect_tool_parser(mistral) is MistralToolParser
    r1 = "{{'<｜Assistant｜>' + content.split('</think>')[-1]}}"
    assert detect_reasoning_parser(r1) is DeepSeekR1ReasoningParser
    for nothing in (None, "", HERMES_TEMPLATE.replace("tool_call", "call")):
        assert detect_tool_parser(nothing) is None
        assert detect_reasoning_parser(nothing) is None
