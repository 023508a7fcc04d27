"""OpenAIServingChat: ``POST /v1/chat/completions``, whole or streamed.

The messages, and the request's tools, are written out with the model's chat template (or the
server's ``--chat-template``), then generated from like a completion, under the guided
decoding that ``response_format``, ``guided_*`` or a forcing ``tool_choice`` asks for. The
answer's reasoning and function calls are parsed out of its text (see message_parser.py).
Only text content is supported: images and other parts are refused with a 400 that says so.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_core.engine.async_llm import EngineDeadError, RequestFailedError, RequestStream
from llm_core.entrypoints.openai.errors import APIError, parse_request
from llm_core.entrypoints.openai.message_parser import MessageParser
from llm_core.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from llm_core.entrypoints.openai.serving import (
    ChoiceState,
    ClientDisconnectedError,
    OpenAIServing,
    engine_failure,
    usage,
)
from llm_core.entrypoints.openai.streaming import EventStreamResponse
from llm_core.entrypoints.openai.structured import Guidance, ToolPlan, guidance_of, tool_plan
from llm_core.outputs import CompletionOutput, RequestOutput
from llm_core.sampling_params import SamplingParams


@dataclass(slots=True)
class _Job:
    request_id: str
    created: int
    model: str
    num_prompt_tokens: int
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs asked for
    stream: RequestStream
    request: ChatCompletionRequest
    prompt_text: str
    tools: ToolPlan
    guided: bool


class OpenAIServingChat:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, http: Request) -> Response:
        serving = self.serving
        req = parse_request(ChatCompletionRequest, await http.body())
        model = serving.check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true; set both", param="top_logprobs")
        top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        tools = tool_plan(req, serving.tool_parser)
        guidance = self._guidance(req, tools)
        prompt_text, prompt = await serving.render_chat(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=req.add_special_tokens,
            chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
            tools=tools.template_tools(),
        )
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        params = serving.sampling_params(
            req,
            num_prompt_tokens=len(prompt),
            max_tokens=max_tokens,
            logprobs=top_logprobs,
            prompt_param="messages",
            guidance=guidance,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await serving.submit(request_id, [prompt], [params], guidance)
        job = _Job(
            request_id, int(time.time()), model, len(prompt), params, top_logprobs, stream, req,
            prompt_text, tools, guidance is not None,
        )  # fmt: skip
        if req.stream:
            return EventStreamResponse(self._stream(job), on_close=stream.abort)
        try:
            result = await serving.run_while_connected(http, self._collect(job))
        except ClientDisconnectedError:
            return Response(status_code=499)
        return JSONResponse(result.model_dump())

    @staticmethod
    def _guidance(req: ChatCompletionRequest, tools: ToolPlan) -> Guidance | None:
        """The request's guided decoding: its response_format or guided_* field, or the
        calls its tool_choice forces (not both)."""
        guidance = guidance_of(req)
        forced = tools.guidance()
        if forced is None:
            return guidance
        if guidance is not None:
            raise APIError(
                400,
                f"tool_choice {tools.choice!r} makes the answer function calls, so it cannot "
                f"also follow {guidance.param}; leave one out",
                param="tool_choice",
            )
        return forced

    def _parser(self, job: _Job) -> MessageParser:
        """A parser for one choice's answer: its reasoning and function calls."""
        serving = self.serving
        reasoning = None
        if serving.reasoning_parser is not None:
            # Under guided decoding the answer reasons only if the grammar lets it open with
            # <think>: it never starts inside the reasoning.
            reasoning = serving.reasoning_parser(
                job.prompt_text, inside=False if job.guided else None
            )
        return MessageParser(
            reasoning,
            job.tools.parser(serving.tool_parser),
            forced=job.tools.forced,
            max_calls=None if job.tools.parallel else 1,
        )

    async def _collect(self, job: _Job) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        try:
            async with job.stream:
                async for output in job.stream:
                    final = output
        except (EngineDeadError, RequestFailedError) as exc:
            raise engine_failure(exc) from None
        assert final is not None and final.finished
        choices = []
        for out in final.outputs:
            message, finish_reason = self._parser(job).message(out.text, out.finish_reason)
            choice = ChatCompletionChoice(
                index=out.index,
                message=message,
                logprobs=self._logprobs(job, out, 0, len(out.token_ids)),
                finish_reason=finish_reason,
                stop_reason=out.stop_reason,
            )
            choices.append(choice)
        generated = sum(len(out.token_ids) for out in final.outputs)
        return ChatCompletionResponse(
            id=job.request_id,
            created=job.created,
            model=job.model,
            choices=choices,
            usage=usage(job.num_prompt_tokens, generated),
            prompt_logprobs=self.serving.prompt_logprobs(final, job.request.prompt_logprobs),
        )

    async def _stream(self, job: _Job) -> AsyncGenerator[str, None]:
        serving, req = self.serving, job.request
        options = req.stream_options
        include_usage = options is not None and options.include_usage
        continuous = options is not None and options.continuous_usage_stats
        states = [ChoiceState(j) for j in range(req.n)]
        parsers = [self._parser(job) for _ in range(req.n)]
        holdback = serving.holdback(job.params)
        generated = 0

        def chunk(choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None) -> str:
            response = ChatCompletionChunk(
                id=job.request_id, created=job.created, model=job.model, choices=choices,
                usage=usage,
            )  # fmt: skip
            return serving.sse(response)

        def usage_now() -> UsageInfo | None:
            return usage(job.num_prompt_tokens, generated) if continuous else None

        try:
            async with job.stream:
                for state in states:
                    role = DeltaMessage(role="assistant", content="")
                    yield chunk(
                        [ChatCompletionStreamChoice(index=state.index, delta=role)], usage_now()
                    )
                async for output in job.stream:
                    generated = sum(len(c.token_ids) for c in output.outputs)
                    for out in output.outputs:
                        state = states[out.index]
                        if state.finished:
                            continue
                        text, first, last = state.advance(out, holdback)
                        parser = parsers[out.index]
                        if parser.passthrough:
                            deltas = [DeltaMessage(content=text)] if text else []
                        else:
                            deltas = parser.deltas(out.text[: state.sent_text], state.finished)
                        news = deltas or (first < last and job.top_logprobs is not None)
                        if not news and not state.finished:
                            continue
                        # A call's first delta comes alone; the logprobs and the finish
                        # reason ride on the step's last chunk.
                        empty = DeltaMessage(content="" if parser.passthrough else None)
                        *before, last_delta = deltas or [empty]
                        for delta in before:
                            choice = ChatCompletionStreamChoice(index=state.index, delta=delta)
                            yield chunk([choice], usage_now())
                        finish_reason = None
                        if state.finished:
                            finish_reason = parser.stream_finish_reason(out.finish_reason)
                        choice = ChatCompletionStreamChoice(
                            index=state.index,
                            delta=last_delta,
                            logprobs=self._logprobs(job, out, first, last),
                            finish_reason=finish_reason,
                            stop_reason=out.stop_reason if state.finished else None,
                        )
                        yield chunk([choice], usage_now())
            if include_usage:
                yield chunk([], usage(job.num_prompt_tokens, generated))
        except Exception as exc:  # the 200 is already sent: report in the stream
            yield serving.error_event(exc)
        yield "data: [DONE]\n\n"

    def _logprobs(
        self, job: _Job, out: CompletionOutput, first: int, last: int
    ) -> ChoiceLogprobs | None:
        if job.top_logprobs is None:
            return None
        content = [
            TokenLogprob(
                token=item.token,
                logprob=item.logprob,
                bytes=list(item.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in item.top
                ],
            )
            for item in self.serving.token_logprobs(out, first, last, job.top_logprobs)
        ]
        return ChoiceLogprobs(content=content)
