"""LLM: the offline API, a drop-in for vLLM's ``from vllm import LLM, SamplingParams``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from llm_core.config import EngineArgs
from llm_core.engine.llm_engine import LLMEngine
from llm_core.outputs import RequestOutput
from llm_core.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]
ChatMessages = list[dict[str, Any]]


class LLM:
    """Generate text from a model, batching all prompts of a call together.

    ``LLM(model=None)`` serves the built-in demo model. Keyword arguments are those of
    :class:`~llm_core.config.EngineArgs` (vLLM's names: ``dtype``, ``max_model_len``,
    ``max_num_seqs``, ``enable_prefix_caching``, ``seed`` ...) plus ``backend``.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.llm_engine = LLMEngine(EngineArgs(model=model, **kwargs))
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in the order given.

        ``prompts``: a string, a list of strings, a list of token ids, a list of such lists,
        or dicts ``{"prompt": str}`` / ``{"prompt_token_ids": list[int]}``.
        """
        items = _normalize_prompts(prompts, prompt_token_ids)
        return self._run(items, sampling_params, use_tqdm)

    def chat(
        self,
        messages: ChatMessages | list[ChatMessages],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, formatted with the model's
        chat template (or ``chat_template``)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[PromptType] = [
            self.apply_chat_template(conv, chat_template, add_generation_prompt)  # type: ignore[arg-type]
            for conv in conversations
        ]
        return self._run(prompts, sampling_params, use_tqdm)

    def apply_chat_template(
        self,
        messages: ChatMessages,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> dict[str, Any]:
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; pass chat_template= or use generate()"
            )
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        return {"prompt": text, "prompt_token_ids": list(ids)}

    def _run(
        self,
        prompts: list[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompts)} prompts; "
                    "pass one, or one per prompt"
                )
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                ids.append(self._add(prompt, params))
        except Exception:
            engine.abort_request(ids)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, leave=False)
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
        bar.close()
        return [finished[i] for i in ids]

    def _add(self, prompt: PromptType, params: SamplingParams) -> str:
        request_id = f"llm-{self._counter}"
        self._counter += 1
        engine = self.llm_engine
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = list(prompt["prompt_token_ids"])
                return engine.add_request(request_id, ids, params, prompt_text=prompt.get("prompt"))
            return engine.add_request(request_id, str(prompt["prompt"]), params)
        return engine.add_request(request_id, prompt, params)


def _normalize_prompts(
    prompts: PromptType | Seq[PromptType] | None, prompt_token_ids: list[list[int]] | None
) -> list[PromptType]:
    if prompt_token_ids is not None:
        if prompts is not None:
            raise ValueError("pass prompts or prompt_token_ids, not both")
        return [list(p) for p in prompt_token_ids]
    if prompts is None:
        raise ValueError("generate() needs prompts")
    if isinstance(prompts, str | dict):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]
