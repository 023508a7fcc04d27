"""OpenAIServingCompletion: ``POST /v1/completions``, whole or streamed.

A request may carry several prompts (strings or token-id lists); each becomes one engine
request with ``n`` completions, and choice ``i * n + j`` is completion ``j`` of prompt ``i``,
as in OpenAI's API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_core.engine.async_llm import EngineDeadError, RequestStream
from llm_core.entrypoints.openai.errors import APIError, parse_request
from llm_core.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from llm_core.entrypoints.openai.serving import (
    ChoiceState,
    ClientDisconnectedError,
    OpenAIServing,
    engine_stopped,
    usage,
)
from llm_core.entrypoints.openai.streaming import EventStreamResponse
from llm_core.outputs import CompletionOutput, RequestOutput
from llm_core.sampling_params import SamplingParams


@dataclass(slots=True)
class _Job:
    """One accepted completion request, as the response writers need it."""

    request_id: str
    created: int
    model: str
    prompt_texts: list[str]
    prompt_lengths: list[int]
    params: list[SamplingParams]
    stream: RequestStream
    request: CompletionRequest

    def prompt_index(self, output: RequestOutput) -> int:
        return int(output.request_id.rsplit("-", 1)[1])


class OpenAIServingCompletion:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def create(self, http: Request) -> Response:
        serving = self.serving
        req = parse_request(CompletionRequest, await http.body())
        model = serving.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported; leave it out", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(
                400, "best_of is not supported; leave it out (or equal to n)", param="best_of"
            )
        if req.echo and req.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs needs the prompt's log-probabilities, which this server "
                "does not compute; drop echo or logprobs",
                param="echo",
            )
        texts, prompts = await self._prompts(req)
        params = [
            serving.sampling_params(
                req,
                num_prompt_tokens=len(ids),
                max_tokens=req.max_tokens,
                logprobs=req.logprobs,
                prompt_param="prompt",
            )
            for ids in prompts
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await serving.submit(request_id, prompts, params)
        job = _Job(
            request_id, int(time.time()), model, texts, [len(p) for p in prompts], params,
            stream, req,
        )  # fmt: skip
        if req.stream:
            return EventStreamResponse(self._stream(job), on_close=stream.abort)
        try:
            result = await serving.run_while_connected(http, self._collect(job))
        except ClientDisconnectedError:
            return Response(status_code=499)
        return JSONResponse(result.model_dump())

    async def _prompts(self, req: CompletionRequest) -> tuple[list[str], list[list[int]]]:
        """Each prompt's text (only needed for echo) and token ids."""
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [list(prompt)]  # type: ignore[arg-type]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "prompt is empty; send at least one prompt", param="prompt")
        texts, ids = [], []
        for item in items:
            if isinstance(item, str):
                ids.append(await self.serving.encode(item, req.add_special_tokens))
                texts.append(item)
            else:
                ids.append(list(item))
                texts.append(await self.serving.decode(list(item)) if req.echo else "")
        return texts, ids

    async def _collect(self, job: _Job) -> CompletionResponse:
        finals: dict[int, RequestOutput] = {}
        try:
            async with job.stream:
                async for output in job.stream:
                    if output.finished:
                        finals[job.prompt_index(output)] = output
        except EngineDeadError as exc:
            raise engine_stopped(exc) from None
        choices = []
        completion_tokens = 0
        n, k = job.request.n, job.request.logprobs
        for p in range(len(job.prompt_lengths)):
            for out in finals[p].outputs:
                prefix = job.prompt_texts[p] if job.request.echo else ""
                logprobs = None
                if k is not None:
                    logprobs, _ = self._logprobs(out, 0, len(out.token_ids), k, len(prefix))
                choices.append(
                    CompletionChoice(
                        index=p * n + out.index,
                        text=prefix + out.text,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                    )
                )
                completion_tokens += len(out.token_ids)
        return CompletionResponse(
            id=job.request_id,
            created=job.created,
            model=job.model,
            choices=choices,
            usage=usage(sum(job.prompt_lengths), completion_tokens),
        )

    async def _stream(self, job: _Job) -> AsyncGenerator[str, None]:
        serving, req = self.serving, job.request
        n, k = req.n, req.logprobs
        options = req.stream_options
        include_usage = options is not None and options.include_usage
        continuous = options is not None and options.continuous_usage_stats
        num_prompts = len(job.prompt_lengths)
        states = {(p, j): ChoiceState(p * n + j) for p in range(num_prompts) for j in range(n)}
        offsets = dict.fromkeys(states, 0)
        generated = [0] * num_prompts

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None) -> str:
            response = CompletionResponse(
                id=job.request_id, created=job.created, model=job.model, choices=choices,
                usage=usage,
            )  # fmt: skip
            return serving.sse(response)

        def usage_now() -> UsageInfo:
            return usage(sum(job.prompt_lengths), sum(generated))

        try:
            async with job.stream:
                if req.echo:
                    for (p, j), state in states.items():
                        offsets[(p, j)] = len(job.prompt_texts[p])
                        echo = CompletionChoice(index=state.index, text=job.prompt_texts[p])
                        yield chunk([echo], usage_now() if continuous else None)
                async for output in job.stream:
                    p = job.prompt_index(output)
                    holdback = serving.holdback(job.params[p])
                    generated[p] = sum(len(c.token_ids) for c in output.outputs)
                    for out in output.outputs:
                        state = states[(p, out.index)]
                        if state.finished:
                            continue
                        text, first, last = state.advance(out, holdback)
                        logprobs = None
                        if k is not None:
                            logprobs, offsets[(p, out.index)] = self._logprobs(
                                out, first, last, k, offsets[(p, out.index)]
                            )
                        news = text or (first < last and k is not None)
                        if not news and not state.finished:
                            continue
                        choice = CompletionChoice(
                            index=state.index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=out.finish_reason if state.finished else None,
                            stop_reason=out.stop_reason if state.finished else None,
                        )
                        yield chunk([choice], usage_now() if continuous else None)
            if include_usage:
                yield chunk([], usage_now())
        except Exception as exc:  # the 200 is already sent: report in the stream
            yield serving.error_event(exc)
        yield "data: [DONE]\n\n"

    def _logprobs(
        self, out: CompletionOutput, first: int, last: int, k: int, offset: int
    ) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy logprobs object for tokens ``[first, last)``, and the text offset
        after them."""
        result = CompletionLogProbs()
        for item in self.serving.token_logprobs(out, first, last, k):
            result.tokens.append(item.token)
            result.token_logprobs.append(item.logprob)
            result.top_logprobs.append(dict(item.top))
            result.text_offset.append(offset)
            offset += len(item.token)
        return result, offset
