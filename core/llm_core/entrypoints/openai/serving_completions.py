"""OpenAIServingCompletion: ``POST /v1/completions``, whole or streamed.

A request may carry several prompts (strings or token-id lists); each becomes one engine
request with ``n`` completions, and choice ``i * n + j`` is completion ``j`` of prompt ``i``,
as in OpenAI's API. ``response_format`` and vLLM's ``guided_*`` fields constrain the text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llm_core.engine.async_llm import EngineDeadError, RequestFailedError, RequestStream
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
    engine_failure,
    usage,
)
from llm_core.entrypoints.openai.streaming import EventStreamResponse
from llm_core.entrypoints.openai.structured import guidance_of
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
        guidance = guidance_of(req)
        texts, prompts = await self._prompts(req)
        # Echo with logprobs reports the prompt tokens' log-probabilities too.
        echo_logprobs = req.logprobs if req.echo else None
        params = [
            serving.sampling_params(
                req,
                num_prompt_tokens=len(ids),
                max_tokens=req.max_tokens,
                logprobs=req.logprobs,
                prompt_param="prompt",
                prompt_logprobs=_larger(echo_logprobs, req.prompt_logprobs),
                guidance=guidance,
            )
            for ids in prompts
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await serving.submit(request_id, prompts, params, guidance)
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
        except (EngineDeadError, RequestFailedError) as exc:
            raise engine_failure(exc) from None
        choices = []
        completion_tokens = 0
        n, k = job.request.n, job.request.logprobs
        for p in range(len(job.prompt_lengths)):
            final = finals[p]
            prefix = job.prompt_texts[p] if job.request.echo else ""
            # Built once per prompt; the completions' offsets continue the prompt's.
            echoed, offset = None, len(prefix)
            if k is not None and job.request.echo:
                echoed, offset = await self._echo_logprobs(final, k)
            prompt_logprobs = self.serving.prompt_logprobs(final, job.request.prompt_logprobs)
            for out in final.outputs:
                logprobs = None
                if k is not None:
                    more, _ = self._logprobs(out, 0, len(out.token_ids), k, offset)
                    logprobs = _joined(echoed, more)
                choices.append(
                    CompletionChoice(
                        index=p * n + out.index,
                        text=prefix + out.text,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                        prompt_logprobs=prompt_logprobs,
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
                echoed: set[int] = set()
                async for output in job.stream:
                    p = job.prompt_index(output)
                    if req.echo and p not in echoed:
                        # Sent with the prompt's first output: its prompt logprobs exist then.
                        echoed.add(p)
                        echo_logprobs, offset = None, len(job.prompt_texts[p])
                        if k is not None:
                            echo_logprobs, offset = await self._echo_logprobs(output, k)
                        for j in range(n):
                            offsets[(p, j)] = offset
                            echo = CompletionChoice(
                                index=states[(p, j)].index,
                                text=job.prompt_texts[p],
                                logprobs=echo_logprobs,
                            )
                            yield chunk([echo], usage_now() if continuous else None)
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

    async def _echo_logprobs(self, output: RequestOutput, k: int) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy logprobs of the echoed prompt: its tokens, None for the first
        (nothing precedes it), then each token's log-probability and the top ``k``; and the
        text offset after the prompt's tokens, where the completion's offsets continue."""
        result = CompletionLogProbs()
        entries = output.prompt_logprobs or []
        offset = 0
        for i, token in enumerate(output.prompt_token_ids):
            entry = entries[i] if i < len(entries) else None
            if entry is None:  # nothing precedes the first token
                text = await self.serving.decode([token])
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                item = self.serving.entry_logprobs(token, entry, k)
                text = item.token
                result.token_logprobs.append(item.logprob)
                result.top_logprobs.append(_by_text(item.top))
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
        return result, offset

    def _logprobs(
        self, out: CompletionOutput, first: int, last: int, k: int, offset: int
    ) -> tuple[CompletionLogProbs, int]:
        """OpenAI's legacy logprobs object for tokens ``[first, last)``, and the text offset
        after them."""
        result = CompletionLogProbs()
        for item in self.serving.token_logprobs(out, first, last, k):
            result.tokens.append(item.token)
            result.token_logprobs.append(item.logprob)
            result.top_logprobs.append(_by_text(item.top))
            result.text_offset.append(offset)
            offset += len(item.token)
        return result, offset


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _by_text(top: Iterable[tuple[str, float]]) -> dict[str, float]:
    """OpenAI's legacy top_logprobs map text to logprob: of tokens that decode to the same
    text, the most likely (the first, in rank order) is kept."""
    out: dict[str, float] = {}
    for text, logprob in top:
        out.setdefault(text, logprob)
    return out


def _joined(first: CompletionLogProbs | None, second: CompletionLogProbs) -> CompletionLogProbs:
    """The echoed prompt's logprobs followed by the completion's."""
    if first is None:
        return second
    return CompletionLogProbs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )
