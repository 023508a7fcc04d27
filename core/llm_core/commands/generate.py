"""``llm-core generate`` (one-shot completion) and ``llm-core chat`` (interactive, streaming)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from llm_core.config import EngineArgs
from llm_core.sampling_params import SamplingParams


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="HF checkpoint directory, .gguf file, or built-in model name (smollm2, "
        "gemma3-270m; fetched on first use) (default: the SmolLM2-135M demo model)",
    )
    g.add_argument("--backend", default=None, help="backend name (default: best available)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", default=None, help="KV cache size, e.g. 2GiB")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per KV-cache block (default: the backend's preference)",
    )
    g.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend-specific setting (repeatable), e.g. device=pocl",
    )
    g.add_argument(
        "--fallback-backend",
        default=None,
        help="run operators the backend lacks on this backend (logged and counted)",
    )
    g.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, vLLM\'s dict as JSON, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4}\' or \'{"method": "draft_model", "model": PATH, '
        '"num_speculative_tokens": 4}\' (default: off; see docs/speculative-decoding.md)',
    )


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=args.model,
        backend=args.backend,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        fallback_backend=args.fallback_backend,
        block_size=args.block_size,
        backend_options=_key_values(args.backend_option),
        speculative_config=args.speculative_config,
    )


def _key_values(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--backend-option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    return options


def _add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def add_parser(sub: Any) -> None:
    gen = sub.add_parser(
        "generate",
        help="complete a prompt and print the text",
        description="Complete PROMPT (raw text, no chat template).",
    )
    gen.add_argument("prompt", nargs="*", help="prompt text (default: read standard input)")
    gen.add_argument(
        "--chat-template",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    add_engine_arguments(gen)
    _add_sampling_arguments(gen, max_tokens=64)
    gen.set_defaults(func=run_generate)

    chat = sub.add_parser(
        "chat",
        help="chat with a model in the terminal, streaming tokens",
        description="Interactive chat; an empty line or Ctrl-D ends it.",
    )
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(chat)
    _add_sampling_arguments(chat, max_tokens=512)
    chat.set_defaults(func=run_chat)


def run_generate(args: argparse.Namespace) -> int:
    from llm_core.entrypoints.llm import LLM

    prompt = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    llm = LLM(**asdict(engine_args_from(args)))
    params = _sampling_from(args)
    if args.chat_template:
        outputs = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompt, params, use_tqdm=False)
    for completion in outputs[0].outputs:
        print(completion.text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from llm_core.engine.llm_engine import LLMEngine
    from llm_core.entrypoints.llm import LLM

    llm = LLM(**asdict(engine_args_from(args)))
    engine: LLMEngine = llm.llm_engine
    params = _sampling_from(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        history.append({"role": "user", "content": line.strip()})
        prompt = llm.apply_chat_template(history)
        request_id = engine.add_request(None, prompt["prompt_token_ids"], params)
        shown = ""
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text = output.outputs[0].text
                print(text[len(shown) :], end="", flush=True)
                shown = text
        print()
        history.append({"role": "assistant", "content": shown})
