"""Structured output: what a request's ``response_format``, vLLM's ``guided_*`` fields and its
``tools`` / ``tool_choice`` ask for, as guided decoding and a tool plan, or a 400 that says
what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llm_core.entrypoints.openai.errors import APIError
from llm_core.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatTool,
    SamplingRequest,
)
from llm_core.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    NamedCallParser,
    RequiredCallsParser,
    ToolParser,
)
from llm_core.sampling_params import GUIDED_BACKENDS, GuidedDecodingParams

#: ``guided_decoding_backend`` values accepted: llguidance's names, and vLLM's "auto".
ACCEPTED_BACKENDS = (*GUIDED_BACKENDS, "auto")
#: The arguments schema of a function declared without one.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
#: Where JSON schemas keep their shared definitions (draft 2019+, and older drafts).
_DEFINITIONS = ("$defs", "definitions")


@dataclass(slots=True)
class Guidance:
    """The guided decoding a request asks for, and the request field that asked (named in the
    error when the engine refuses its schema, regex or grammar)."""

    params: GuidedDecodingParams
    param: str


def guidance_of(request: SamplingRequest) -> Guidance | None:
    """The guided decoding of ``response_format`` or one ``guided_*`` field; None for none."""
    kinds: list[tuple[str, dict[str, Any]]] = []
    fmt = request.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            kinds.append(("response_format", {"json_object": True}))
        elif fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(
                    400,
                    'response_format of type "json_schema" needs a json_schema object: '
                    '{"name": ..., "schema": {...}}',
                    param="response_format.json_schema",
                )
            schema = fmt.json_schema.schema_
            kinds.append(("response_format", {"json": schema or {"type": "object"}}))
        elif fmt.type != "text":
            raise APIError(
                400,
                f"response_format type {fmt.type!r} is not supported; use 'text', "
                "'json_object' or 'json_schema'",
                param="response_format",
            )
    fields = {
        "guided_json": ("json", request.guided_json),
        "guided_regex": ("regex", request.guided_regex),
        "guided_choice": ("choice", request.guided_choice),
        "guided_grammar": ("grammar", request.guided_grammar),
    }
    for name, (key, value) in fields.items():
        if value is not None:
            kinds.append((name, {key: value}))
    backend = request.guided_decoding_backend
    if backend is not None and backend not in ACCEPTED_BACKENDS:
        raise APIError(
            400,
            f"guided_decoding_backend {backend!r} is not available; this server guides with "
            f"llguidance: leave it out or use {' or '.join(map(repr, GUIDED_BACKENDS))}",
            param="guided_decoding_backend",
        )
    if len(kinds) > 1:
        raise APIError(
            400,
            f"{' and '.join(name for name, _ in kinds)} each constrain the output; give only one",
            param=kinds[1][0],
        )
    whitespace = request.guided_whitespace_pattern
    if not kinds:
        if whitespace is not None:
            raise APIError(
                400,
                "guided_whitespace_pattern applies to JSON output only; give guided_json or a "
                "JSON response_format with it, or leave it out",
                param="guided_whitespace_pattern",
            )
        return None
    param, spec = kinds[0]
    if whitespace is not None:
        if "json" not in spec and "json_object" not in spec:
            raise APIError(
                400,
                f"guided_whitespace_pattern applies to JSON output only, not to {param}",
                param="guided_whitespace_pattern",
            )
        spec["whitespace_pattern"] = whitespace
    return Guidance(_guided_params(param, spec), param)


def _guided_params(param: str, spec: dict[str, Any]) -> GuidedDecodingParams:
    try:
        return GuidedDecodingParams(**spec)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ToolPlan:
    """How a chat request uses its tools. ``choice``: "none", "auto", "required" or "named"
    (then ``function`` is the name); ``parallel``: several calls allowed in one answer."""

    choice: str = "none"
    tools: list[ChatTool] = field(default_factory=list)
    function: str | None = None
    parallel: bool = True

    @property
    def uses_tools(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them (OpenAI's form), or None."""
        if not self.uses_tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def guidance(self) -> Guidance | None:
        """The guided decoding that forces the calls of "required" and named tool choices."""
        if self.choice == "named":
            tool = next(t for t in self.tools if t.function.name == self.function)
            schema = tool.function.parameters or NO_PARAMETERS
            return Guidance(_guided_params("tool_choice", {"json": schema}), "tools")
        if self.choice == "required":
            schema = _calls_schema(self.tools, self.parallel)
            return Guidance(_guided_params("tool_choice", {"json": schema}), "tools")
        return None

    def parser(self, auto: type[ToolParser] | None) -> ToolParser | None:
        """The parser of this request's answers; ``auto``: the server's for its model."""
        names = [tool.function.name for tool in self.tools]
        id_style = auto(names) if auto is not None else None
        if self.choice == "named":
            assert self.function is not None
            return NamedCallParser(self.function, id_style)
        if self.choice == "required":
            return RequiredCallsParser(names, id_style)
        if self.choice == "auto":
            return id_style
        return None


def tool_plan(request: ChatCompletionRequest, auto: type[ToolParser] | None) -> ToolPlan:
    """The request's tool plan; a 400 for a tool_choice it cannot have. ``auto``: the server's
    tool-call parser (None: the model's call format is unknown, so "auto" cannot be served)."""
    tools = request.tools or []
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    names = [tool.function.name for tool in tools]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise APIError(
            400, f"tools: the function names {duplicates} appear more than once", param="tools"
        )
    parallel = request.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan("none", tools, parallel=parallel)
    if not tools:
        raise APIError(
            400,
            "tool_choice needs tools: give the functions in tools, or leave tool_choice out",
            param="tool_choice",
        )
    if not isinstance(choice, str):
        if choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function {choice.function.name!r}, which is not among "
                f"the tools ({', '.join(map(repr, names))})",
                param="tool_choice",
            )
        return ToolPlan("named", tools, choice.function.name, parallel)
    if choice == "auto" and auto is None:
        raise APIError(
            400,
            "tools with tool_choice 'auto' need a tool-call parser, and this model's chat "
            "template does not show which call format it writes; start the server with "
            f"--tool-call-parser ({' | '.join(TOOL_PARSERS)}), or use tool_choice 'required' "
            "or a named function, which work with any model",
            param="tool_choice",
        )
    return ToolPlan(choice, tools, parallel=parallel)


def _calls_schema(tools: list[ChatTool], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": a JSON array of one or more (one only without
    parallel calls) ``{"name": <a tool>, "parameters": <its arguments>}`` objects. The tools'
    shared definitions move to the top, where their ``$ref``s point."""
    definitions: dict[str, dict[str, Any]] = {}
    branches = []
    for tool in tools:
        parameters = dict(tool.function.parameters or NO_PARAMETERS)
        for key in _DEFINITIONS:
            for name, definition in (parameters.pop(key, None) or {}).items():
                known = definitions.setdefault(key, {}).setdefault(name, definition)
                if known != definition:
                    raise APIError(
                        400,
                        f"tools: two functions define {key} {name!r} differently; tool_choice "
                        "'required' needs one definition per name",
                        param="tools",
                    )
        branches.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": branches}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update(definitions)
    return schema


def arguments_for_template(arguments: str | dict[str, Any]) -> Any:
    """A past call's arguments as chat templates expect them: an object (Llama's and Qwen's
    templates write it with ``tojson``); JSON text that is no object stays text."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments
