"""ServerConfig: the settings of the OpenAI-compatible server (beyond the engine's own)."""

from __future__ import annotations

from dataclasses import dataclass

from llm_core.entrypoints.openai.reasoning import reasoning_parser_class
from llm_core.entrypoints.openai.tool_parsers import tool_parser_class

#: Default bound on a request body: ample for a full context of token ids as JSON.
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
#: Default number of requests that may wait beyond the engine's running batch.
DEFAULT_MAX_QUEUE = 1024


@dataclass(slots=True)
class ServerConfig:
    """``model_name``: the name clients pass as ``model`` (and /v1/models lists).
    ``api_key``: when set, every route but /health, /version and /metrics requires
    ``Authorization: Bearer <api_key>``. ``max_request_bytes``: larger bodies get 413.
    ``chat_template``: a Jinja template that replaces the tokenizer's own.
    ``tool_call_parser`` / ``reasoning_parser``: how the model writes function calls
    (hermes, llama3_json, mistral) and reasoning (qwen3, deepseek_r1); None: detected from
    the chat template.
    """

    model_name: str
    model_path: str | None = None
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    chat_template: str | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty or blank")
        if self.tool_call_parser is not None:
            tool_parser_class(self.tool_call_parser)  # raises, naming the known ones
        if self.reasoning_parser is not None:
            reasoning_parser_class(self.reasoning_parser)
