"""OpenAIServingTokenization: vLLM's ``POST /tokenize`` and ``POST /detokenize``.

``/tokenize`` takes a ``prompt`` (as /v1/completions would tokenize it) or ``messages`` (as
/v1/chat/completions would, through the chat template); ``/detokenize`` turns token ids back
into text.
"""

from __future__ import annotations

import json

from starlette.requests import Request

from llm_core.entrypoints.openai.errors import parse_request
from llm_core.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from llm_core.entrypoints.openai.serving import OpenAIServing


class OpenAIServingTokenization:
    def __init__(self, serving: OpenAIServing):
        self.serving = serving

    async def tokenize(self, http: Request) -> TokenizeResponse:
        serving = self.serving
        body = await http.body()
        if _has_key(body, "messages"):
            chat = parse_request(TokenizeChatRequest, body)
            serving.check_model(chat.model)
            _, ids = await serving.render_chat(
                chat.messages,
                add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=chat.continue_final_message,
                add_special_tokens=chat.add_special_tokens,
                chat_template=chat.chat_template,
                chat_template_kwargs=chat.chat_template_kwargs,
                tools=[tool.model_dump(exclude_none=True) for tool in chat.tools]
                if chat.tools
                else None,
            )
            want_strs = chat.return_token_strs
        else:
            plain = parse_request(TokenizeCompletionRequest, body)
            serving.check_model(plain.model)
            ids = await serving.encode(plain.prompt, plain.add_special_tokens)
            want_strs = plain.return_token_strs
        strs = None
        if want_strs:
            strs = [str(s) for s in await serving.run_tokenizer(_token_strs, serving, ids)]
        return TokenizeResponse(
            count=len(ids), max_model_len=serving.max_model_len, tokens=ids, token_strs=strs
        )

    async def detokenize(self, http: Request) -> DetokenizeResponse:
        req = parse_request(DetokenizeRequest, await http.body())
        self.serving.check_model(req.model)
        return DetokenizeResponse(prompt=await self.serving.decode(req.tokens))


def _token_strs(serving: OpenAIServing, ids: list[int]) -> list[str]:
    return list(serving.tokenizer.convert_ids_to_tokens(ids))


def _has_key(body: bytes, key: str) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False  # the plain parser reports the malformed JSON
    return isinstance(data, dict) and key in data
