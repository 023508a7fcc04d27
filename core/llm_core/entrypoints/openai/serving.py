"""OpenAIServing: what the completion, chat and tokenizer endpoints share.

Model-name checks, tokenization (on a private copy of the tokenizer, in one worker thread, so
neither the event loop nor the engine thread is blocked or shared), the chat template with its
tools and the tool-call and reasoning parsers it calls for, building SamplingParams with
OpenAI's context-length errors, submitting to the engine with the overload rules, streaming
deltas, and log-probability formatting.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.requests import Request

from llm_core.engine.async_llm import (
    AsyncLLM,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    RequestStream,
)
from llm_core.engine.grammar_compiler import GrammarError
from llm_core.engine.llm_engine import RequestError
from llm_core.entrypoints.openai.config import ServerConfig
from llm_core.entrypoints.openai.errors import APIError
from llm_core.entrypoints.openai.protocol import (
    ChatMessage,
    PromptLogprob,
    PromptLogprobs,
    SamplingRequest,
    UsageInfo,
)
from llm_core.entrypoints.openai.reasoning import (
    ReasoningParser,
    detect_reasoning_parser,
    reasoning_parser_class,
)
from llm_core.entrypoints.openai.structured import Guidance, arguments_for_template
from llm_core.entrypoints.openai.tool_parsers import (
    ToolParser,
    detect_tool_parser,
    tool_parser_class,
)
from llm_core.metrics import EngineMetrics
from llm_core.outputs import CompletionOutput, Logprob, RequestOutput
from llm_core.sampling_params import SamplingParams

T = TypeVar("T")

log = logging.getLogger("llm_core.server")

#: JSON has no -inf: a token the model rules out entirely is reported with this logprob.
MIN_LOGPROB = -9999.0


class ClientDisconnectedError(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


@dataclass(slots=True)
class ChoiceState:
    """How much of one choice has been streamed so far."""

    index: int
    sent_text: int = 0
    sent_tokens: int = 0
    finished: bool = False

    def advance(self, output: CompletionOutput, holdback: int) -> tuple[str, int, int]:
        """The text not sent yet, and the range of tokens not sent yet.

        While the choice runs, the last ``holdback`` characters are kept back: a stop string
        may still begin inside them, and text once sent cannot be taken back.
        """
        done = output.finish_reason is not None
        end = len(output.text) if done else max(self.sent_text, len(output.text) - holdback)
        text = output.text[self.sent_text : end]
        first, last = self.sent_tokens, len(output.token_ids)
        self.sent_text, self.sent_tokens, self.finished = end, last, done
        return text, first, last


@dataclass(slots=True)
class TokenLogprobs:
    """One generated token's log-probability and the ``k`` most likely alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


class OpenAIServing:
    """Shared machinery of the OpenAI endpoints; one instance per app."""

    def __init__(self, llm: AsyncLLM, config: ServerConfig, metrics: EngineMetrics | None):
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.vocab_size
        # The engine thread uses the engine's tokenizer; a fast tokenizer must not be used by
        # two threads at once, so the server keeps its own copy for its one worker thread.
        self.tokenizer = copy.deepcopy(llm.tokenizer)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llm-core-tokenizer")
        template = _template_text(
            config.chat_template or getattr(llm.tokenizer, "chat_template", None)
        )
        #: How this model writes function calls (None: unknown, so tool_choice "auto" is
        #: refused) and its reasoning (None: no reasoning parsed); named by the server's
        #: options, or detected from the chat template.
        self.tool_parser: type[ToolParser] | None = (
            tool_parser_class(config.tool_call_parser)
            if config.tool_call_parser
            else detect_tool_parser(template)
        )
        self.reasoning_parser: type[ReasoningParser] | None = (
            reasoning_parser_class(config.reasoning_parser)
            if config.reasoning_parser
            else detect_reasoning_parser(template)
        )
        log.info(
            "tool-call parser: %s; reasoning parser: %s",
            self.tool_parser.name if self.tool_parser else "none",
            self.reasoning_parser.name if self.reasoning_parser else "none",
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- checks ----------------------------------------------------------------------------

    def check_model(self, name: str | None) -> str:
        if name is None or name == self.config.model_name:
            return self.config.model_name
        raise APIError(
            404,
            f"the model {name!r} does not exist on this server; it serves "
            f"{self.config.model_name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )

    # ---- tokenizer -------------------------------------------------------------------------

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        def encode() -> list[int]:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

        return await self.run_tokenizer(encode)

    async def decode(self, token_ids: list[int]) -> str:
        self.check_token_ids(token_ids, "tokens")
        return str(await self.run_tokenizer(self.tokenizer.decode, token_ids))

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400,
                f"token ids {bad[:5]} are outside this model's vocabulary [0, {self.vocab_size})",
                param=param,
                code="invalid_value",
            )

    async def render_chat(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        add_special_tokens: bool,
        chat_template: str | None,
        chat_template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """The conversation as the model's chat template writes it (with ``tools``, in
        OpenAI's form, when given), and its token ids."""
        if chat_template is not None:
            raise APIError(
                400,
                "a chat template in the request is not accepted (templates are code); start "
                "the server with --chat-template instead",
                param="chat_template",
            )
        if add_generation_prompt and continue_final_message:
            raise APIError(
                400,
                "add_generation_prompt and continue_final_message cannot both be true; set "
                "add_generation_prompt to false to continue the last message",
                param="continue_final_message",
            )
        template = self.config.chat_template
        if template is None and not getattr(self.tokenizer, "chat_template", None):
            raise APIError(
                400,
                "this model has no chat template; use /v1/completions, or start the server "
                "with --chat-template FILE",
                param="messages",
            )
        conversation = [_message_dict(i, m) for i, m in enumerate(messages)]
        kwargs = dict(chat_template_kwargs or {})

        def render() -> tuple[str, list[int]]:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                tokenize=False,
                **kwargs,
            )
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return str(text), list(ids)

        try:
            return await self.run_tokenizer(render)
        except (TemplateError, ValueError, TypeError) as exc:
            raise APIError(
                400, f"the chat template could not render these messages: {exc}", param="messages"
            ) from None

    # ---- sampling --------------------------------------------------------------------------

    def sampling_params(
        self,
        request: SamplingRequest,
        *,
        num_prompt_tokens: int,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_param: str,
        prompt_logprobs: int | None = None,
        guidance: Guidance | None = None,
    ) -> SamplingParams:
        """SamplingParams for one prompt, or a 400 that says what to change.
        ``prompt_logprobs`` overrides the request's (echo with logprobs needs them);
        ``guidance`` constrains the output."""
        limit = self.max_model_len
        room = limit - num_prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {num_prompt_tokens} tokens, but this model's context is "
                f"{limit} tokens (max_model_len) including at least one generated token; "
                "shorten the prompt",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"this model's context is {limit} tokens, but the prompt has "
                f"{num_prompt_tokens} tokens and the request asks for {max_tokens} more; "
                f"ask for at most {room} tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if request.logit_bias:
            raise APIError(400, "logit_bias is not supported; leave it out", param="logit_bias")
        if request.stream_options is not None and not request.stream:
            raise APIError(
                400, "stream_options is only allowed when stream is true", param="stream_options"
            )
        if request.prompt_logprobs is not None and request.stream:
            raise APIError(
                400,
                "prompt_logprobs are returned in non-streamed responses only; set stream to "
                "false or leave prompt_logprobs out",
                param="prompt_logprobs",
            )

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        try:
            return SamplingParams(
                n=request.n,
                temperature=pick(request.temperature, 1.0),
                top_p=pick(request.top_p, 1.0),
                top_k=pick(request.top_k, 0),
                min_p=pick(request.min_p, 0.0),
                presence_penalty=pick(request.presence_penalty, 0.0),
                frequency_penalty=pick(request.frequency_penalty, 0.0),
                repetition_penalty=pick(request.repetition_penalty, 1.0),
                seed=request.seed,
                stop=request.stop,
                stop_token_ids=request.stop_token_ids,
                ignore_eos=request.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=request.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=pick(prompt_logprobs, request.prompt_logprobs),
                skip_special_tokens=request.skip_special_tokens,
                spaces_between_special_tokens=request.spaces_between_special_tokens,
                include_stop_str_in_output=request.include_stop_str_in_output,
                guided_decoding=guidance.params if guidance is not None else None,
            )
        except ValueError as exc:
            message = str(exc)
            detail = message.partition(": ")[2] or message
            raise APIError(400, message, param=detail.split(" ")[0], code="invalid_value") from None

    async def submit(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        guidance: Guidance | None = None,
    ) -> RequestStream:
        """Queue one engine request per prompt (``{request_id}-{i}``), all or none. A schema,
        regex or grammar the engine cannot use is a 400 naming ``guidance.param``."""
        items = [(f"{request_id}-{i}", ids, p) for i, (ids, p) in enumerate(zip(prompts, params))]
        try:
            return await self.llm.add_requests(items)
        except EngineOverloadedError as exc:
            if self.metrics is not None:
                self.metrics.observe_rejected("overloaded")
            raise APIError(
                503,
                str(exc),
                code="server_overloaded",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not running: {exc}", code="engine_dead") from None
        except RequestError as exc:
            if isinstance(exc.__cause__, GrammarError):
                param = guidance.param if guidance is not None else None
                message = f"{param}: {exc}" if param else str(exc)
                raise APIError(400, message, param=param, code="invalid_value") from None
            raise APIError(400, str(exc), code="invalid_prompt") from None

    # ---- responses -------------------------------------------------------------------------

    @staticmethod
    def holdback(params: SamplingParams) -> int:
        return max((len(s) for s in params.stop_strings), default=1) - 1

    @staticmethod
    def token_logprobs(
        output: CompletionOutput, first: int, last: int, k: int
    ) -> list[TokenLogprobs]:
        """Tokens ``[first, last)`` of ``output`` with their logprobs and top ``k``."""
        if output.logprobs is None:
            return []
        end = min(last, len(output.token_ids), len(output.logprobs))
        return [
            OpenAIServing.entry_logprobs(output.token_ids[i], output.logprobs[i], k)
            for i in range(first, end)
        ]

    @staticmethod
    def entry_logprobs(token: int, entry: dict[int, Logprob], k: int) -> TokenLogprobs:
        """``token``'s text and log-probability in an engine logprobs entry, with the top
        ``k`` of the entry in rank order."""
        chosen = entry.get(token)
        top = sorted(
            (lp for lp in entry.values() if lp.rank is not None and lp.rank <= k),
            key=lambda lp: lp.rank or 0,
        )[:k]
        return TokenLogprobs(
            token=(chosen.decoded_token or "") if chosen else "",
            logprob=clamp_logprob(chosen.logprob) if chosen else MIN_LOGPROB,
            top=[(lp.decoded_token or "", clamp_logprob(lp.logprob)) for lp in top],
        )

    @staticmethod
    def prompt_logprobs(output: RequestOutput, k: int | None) -> PromptLogprobs | None:
        """The prompt's log-probabilities in vLLM's JSON form: each prompt token and its top
        ``k`` (the engine may hold more, for echo); None when ``k`` is None."""
        if k is None or output.prompt_logprobs is None:
            return None
        result: PromptLogprobs = []
        for token, entry in zip(output.prompt_token_ids, output.prompt_logprobs, strict=False):
            if entry is None:
                result.append(None)
                continue
            kept = {
                t: lp
                for t, lp in entry.items()
                if t == token or (lp.rank is not None and lp.rank <= k)
            }
            result.append(
                {
                    str(t): PromptLogprob(
                        logprob=clamp_logprob(lp.logprob),
                        rank=lp.rank,
                        decoded_token=lp.decoded_token,
                    )
                    for t, lp in kept.items()
                }
            )
        return result

    @staticmethod
    def sse(payload: BaseModel | dict[str, Any] | str) -> str:
        """One server-sent event: ``data: <json>`` and a blank line."""
        if isinstance(payload, BaseModel):
            data = payload.model_dump_json()
        elif isinstance(payload, dict):
            data = json.dumps(payload)
        else:
            data = payload
        return f"data: {data}\n\n"

    @staticmethod
    def error_event(exc: BaseException) -> str:
        """The event that ends a stream that failed after its 200 was sent."""
        if isinstance(exc, APIError):
            error = exc
        elif isinstance(exc, EngineDeadError | RequestFailedError):
            error = engine_failure(exc)
        else:
            error = APIError(500, f"internal error: {exc!r}")
        return OpenAIServing.sse(error.body())

    async def run_while_connected(self, request: Request, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` but cancel it (its requests are aborted) if the client goes away."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            watcher.cancel()
        if task.cancelled():
            raise ClientDisconnectedError()
        return task.result()


def clamp_logprob(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                param = f"messages[{index}].content[{j}].type"
                raise APIError(
                    400,
                    f"{param}: only text parts are supported, got a {part.type!r} part; send text",
                    param=param,
                )
            texts.append(part.text)
        text = "\n".join(texts)
    result: dict[str, Any] = {"role": message.role, "content": text}
    if message.name is not None:
        result["name"] = message.name
    if message.tool_calls:
        result["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type,
                "function": {
                    "name": call.function.name,
                    "arguments": arguments_for_template(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.function_call is not None:  # OpenAI's deprecated form; templates may know it
        result["function_call"] = {
            "name": message.function_call.name,
            "arguments": arguments_for_template(message.function_call.arguments),
        }
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    return result


def _template_text(template: str | dict[str, str] | None) -> str | None:
    """A chat template's text; all of them for a tokenizer with named templates."""
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template


def engine_failure(exc: EngineDeadError | RequestFailedError) -> APIError:
    """The error a request gets when the engine stopped while serving it (503), or when a
    step that ran it failed on the backend (500; the engine goes on serving the others)."""
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="request_failed")
    return APIError(503, f"the engine stopped: {exc}", code="engine_dead")


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
