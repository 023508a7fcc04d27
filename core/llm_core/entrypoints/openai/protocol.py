"""The wire format of the OpenAI-compatible server: request and response models (pydantic).

Requests follow OpenAI's API with vLLM's extra sampling and guided-decoding fields. They are
validated strictly (a string where a number belongs is an error, not a conversion), every
number must be finite (NaN, Infinity and literals beyond the float range such as ``1e309``
are refused) and within its range; fields this server does not know are ignored, as OpenAI
and vLLM ignore them. Messages follow OpenAI's rules: a known role, content unless OpenAI lets
it be null, content parts of a known type. The same models generate the request bodies of the
server's OpenAPI document (see openapi.py). Responses carry exactly OpenAI's fields, plus
vLLM's ``stop_reason`` on each choice and ``reasoning_content`` on messages.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

#: Most top log-probabilities a request may ask for per token (OpenAI's chat limit).
MAX_LOGPROBS = 20
#: Most completions a request may ask for per prompt (OpenAI's limit).
MAX_N = 128
#: Bounds of the integers the engine keeps: top_k and token counts are int32, seeds int64.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: OpenAI's message roles ("function" is deprecated there, and still accepted).
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
#: OpenAI's content part types; only "text" is rendered here, the others are a 400 that says so.
ContentPartType = Literal["text", "image_url", "input_audio", "file", "refusal"]


def _integral(value: object) -> object:
    """JSON has one number type: 16.0 is the integer 16 (as JSON Schema says), 16.5 is not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: An integer field's validator, after its bounds (so that they stay in its JSON schema).
INTEGRAL = BeforeValidator(_integral)
#: A JSON number with no fraction (not a string, not a bool).
Int = Annotated[int, INTEGRAL]
#: A token id in a field the engine checks against the vocabulary.
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX), INTEGRAL]
#: How many top log-probabilities to return per token.
LogprobCount = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL]
#: How many tokens to generate at most.
MaxTokens = Annotated[int, Field(ge=1), INTEGRAL]


class RequestModel(BaseModel):
    """Base of every request: strict types, finite numbers, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------
# requests
# ----------------------------------------------------------------------------------------------


class StreamOptions(RequestModel):
    #: Send a last chunk with the request's token usage (and ``usage: null`` on the others).
    include_usage: bool = False
    #: vLLM: put the usage so far on every chunk.
    continuous_usage_stats: bool = False


class JsonSchemaFormat(RequestModel):
    """``response_format.json_schema``: the schema the answer must be valid against."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    #: "text", "json_object" or "json_schema" (checked where it is used, to say so plainly).
    type: str
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Numbers must be finite and
    in OpenAI's ranges (vLLM's for its extras)."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] = 1
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), INTEGRAL] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    #: -1 or 0: off.
    top_k: Annotated[int, Field(ge=-1, le=INT32_MAX), INTEGRAL] | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0, le=INT32_MAX), INTEGRAL] = 0
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    #: The top log-probabilities of each prompt token, returned in non-streamed responses.
    prompt_logprobs: LogprobCount | None = None
    # structured output: OpenAI's response_format and vLLM's guided decoding fields
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None


class CompletionRequest(SamplingRequest):
    #: Token ids are checked against the vocabulary where they are used.
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: MaxTokens | None = 16
    logprobs: LogprobCount | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


def _given(field: str, schema: dict[str, JsonValue]) -> dict[str, JsonValue]:
    return {"required": [field], "properties": {field: schema}}


class ContentPart(RequestModel):
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"const": "text"}}},
            "then": _given("text", {"type": "string"}),
        }
    )

    type: ContentPartType
    #: The text of a "text" part (required there).
    text: str | None = Field(None, validate_default=True)

    @field_validator("text")
    @classmethod
    def _text_part_has_text(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is None and info.data.get("type") == "text":
            raise PydanticCustomError(
                "text_required", 'a "text" content part needs "text", a string'
            )
        return text


class FunctionCallIn(RequestModel):
    name: str
    #: JSON text, as OpenAI sends it (an object is accepted too).
    arguments: str | dict[str, Any]


class ToolCallIn(RequestModel):
    """A call the assistant made earlier in the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


#: The roles whose messages always need content.
ROLES_WITH_CONTENT = ("system", "developer", "user", "tool")


_CONTENT: dict[str, JsonValue] = {"type": ["string", "array"]}
#: OpenAI's rule on content (ChatMessage), in JSON Schema, for the OpenAPI document.
_CONTENT_RULE: list[JsonValue] = [
    {
        "if": {"properties": {"role": {"enum": list(ROLES_WITH_CONTENT)}}},
        "then": _given("content", _CONTENT),
    },
    {
        "if": {"properties": {"role": {"const": "assistant"}}},
        "then": {
            "anyOf": [
                _given("content", _CONTENT),
                _given("tool_calls", {"type": "array", "minItems": 1}),
                _given("function_call", {"type": "object"}),
            ]
        },
    },
]


class ChatMessage(RequestModel):
    """One message of the conversation. As in OpenAI's API, content may be null (or left
    out) only in an assistant message with tool_calls (or the deprecated function_call) and in
    a deprecated function message."""

    model_config = ConfigDict(json_schema_extra={"allOf": _CONTENT_RULE})

    # content comes last, so that its check sees the fields before it
    role: Role
    name: str | None = None
    #: An assistant message's function calls.
    tool_calls: list[ToolCallIn] | None = None
    #: OpenAI's deprecated form of one call in an assistant message.
    function_call: FunctionCallIn | None = None
    #: A "tool" message: the id of the call whose result it is.
    tool_call_id: str | None = None
    content: str | list[ContentPart] | None = Field(None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_unless_allowed(
        cls, content: str | list[ContentPart] | None, info: ValidationInfo
    ) -> str | list[ContentPart] | None:
        role = info.data.get("role")
        if content is not None:
            return content
        if role in ROLES_WITH_CONTENT:
            message = "a {role} message needs content"
        elif role == "assistant" and not (
            info.data.get("tool_calls") or info.data.get("function_call")
        ):
            message = "an assistant message needs content, or tool_calls"
        else:
            return content
        raise PydanticCustomError(
            "content_required",
            message + ": a string or a list of content parts (null is allowed only in an "
            "assistant message with tool_calls, as in OpenAI's API)",
            {"role": role},
        )


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1)
    description: str | None = None
    #: A JSON schema of the arguments object (None: no arguments).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: LogprobCount | None = None
    tools: list[ChatTool] | None = None
    #: Default: "auto" with tools, "none" without.
    tool_choice: ToolChoice | None = None
    #: False: at most one call per answer.
    parallel_tool_calls: bool | None = None
    # vLLM's chat extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[Int]


# ----------------------------------------------------------------------------------------------
# responses
# ----------------------------------------------------------------------------------------------


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"


class VersionResponse(ResponseModel):
    version: str
    hal_api_version: str


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llm-core"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogProbs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(ResponseModel):
    """vLLM's form of one token's log-probability in ``prompt_logprobs``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


#: Per prompt token (None for the first): token id (as a string) -> its log-probability.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None


def _sent_unless_none() -> Any:
    """A field that defaults to None and is left out of the JSON while it is None."""
    return Field(None, exclude_if=lambda value: value is None)


class FunctionCall(ResponseModel):
    name: str
    #: The arguments object as JSON text.
    arguments: str


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    #: None when the answer is only function calls.
    content: str | None
    #: With a reasoning parser: the text the model wrote inside <think>...</think>.
    reasoning_content: str | None = _sent_unless_none()
    tool_calls: list[ToolCall] | None = _sent_unless_none()


class ChatCompletionChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaFunctionCall(ResponseModel):
    name: str | None = _sent_unless_none()
    arguments: str | None = _sent_unless_none()


class DeltaToolCall(ResponseModel):
    """A piece of a streamed function call: the first has ``id``, ``type`` and the name, the
    next ones more of the arguments' JSON text."""

    index: int
    id: str | None = _sent_unless_none()
    type: Literal["function"] | None = _sent_unless_none()
    function: DeltaFunctionCall


class DeltaMessage(ResponseModel):
    """What a stream chunk adds to a message; fields left None are not sent."""

    role: Literal["assistant"] | None = _sent_unless_none()
    content: str | None = _sent_unless_none()
    reasoning_content: str | None = _sent_unless_none()
    tool_calls: list[DeltaToolCall] | None = _sent_unless_none()


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(ResponseModel):
    prompt: str
