"""``llm-core serve [MODEL]``: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import pathlib
from typing import Any

from llm_core.commands.generate import add_engine_arguments, engine_args_from
from llm_core.config import parse_bytes

#: Environment variable read for the API key when --api-key is not given.
ENV_API_KEY = "LLM_CORE_API_KEY"

log = logging.getLogger("llm_core.server")


def add_parser(subparsers: Any) -> None:
    """Register the ``serve`` command on the CLI's subparsers."""
    from llm_core.entrypoints.openai.config import DEFAULT_MAX_QUEUE, DEFAULT_MAX_REQUEST_BYTES
    from llm_core.entrypoints.openai.reasoning import REASONING_PARSERS
    from llm_core.entrypoints.openai.tool_parsers import TOOL_PARSERS

    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description=(
            "Serve MODEL (an HF checkpoint directory, a .gguf file or a built-in model name: "
            "smollm2, gemma3-270m; default: the SmolLM2-135M demo model) over OpenAI's "
            "/v1/completions and /v1/chat/completions, "
            "with streaming, /tokenize, /detokenize, /health, /version and Prometheus /metrics."
        ),
    )
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the model")
    net = parser.add_argument_group("server")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every "
        "interface, with --api-key)",
    )
    net.add_argument("--port", type=int, default=8000)
    net.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every API route (default: ${ENV_API_KEY})",
    )
    net.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: MODEL)"
    )
    net.add_argument(
        "--chat-template", default=None, help="a Jinja chat template file replacing the model's"
    )
    tools = parser.add_argument_group("tool calling and reasoning")
    tools.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="how the model writes function calls, for tool_choice 'auto' (default: detected "
        "from the chat template; none found: 'auto' is refused)",
    )
    tools.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM compatibility: tool_choice 'auto' is on whenever a tool-call "
        "parser is known",
    )
    tools.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split <think>...</think> into reasoning_content (default: detected from the chat "
        "template)",
    )
    net.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="requests that may wait beyond the --max-num-seqs running ones; more get 503 "
        f"with Retry-After (default {DEFAULT_MAX_QUEUE})",
    )
    net.add_argument(
        "--max-request-bytes",
        default=str(DEFAULT_MAX_REQUEST_BYTES),
        help="largest request body accepted, e.g. 4MiB; larger ones get 413 (default 4MiB)",
    )
    net.add_argument(
        "--shutdown-timeout",
        type=int,
        default=30,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 30)",
    )
    add_engine_arguments(parser)
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from llm_core.entrypoints.openai import ServerConfig, run_server
    from llm_core.loaders import default_model_path

    if args.model_tag and args.model and args.model_tag != args.model:
        raise ValueError(
            f"two models given: {args.model_tag!r} and --model {args.model!r}; give one"
        )
    args.model = args.model_tag or args.model
    engine_args = engine_args_from(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(ENV_API_KEY)
    if not api_key and not _is_loopback(args.host):
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the "
            "model; set --api-key or %s",
            args.host,
            ENV_API_KEY,
        )
    chat_template = None
    if args.chat_template:
        chat_template = pathlib.Path(args.chat_template).read_text(encoding="utf-8")
    name = args.served_model_name or args.model or default_model_path().stem
    config = ServerConfig(
        model_name=name,
        model_path=args.model,
        api_key=api_key or None,
        max_request_bytes=parse_bytes(args.max_request_bytes),
        chat_template=chat_template,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
    # uvicorn follows llm-core's own level (--log-level): INFO shows its startup and access log.
    level = logging.getLevelName(logging.getLogger("llm_core").getEffectiveLevel()).lower()
    log.info(
        "loading %s, then serving it at http://%s:%d/v1 (API key %s)",
        name,
        _url_host(args.host),
        args.port,
        "required" if config.api_key else "not required",
    )
    run_server(
        engine_args,
        config,
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        shutdown_timeout=args.shutdown_timeout,
        log_level=level if level in {"debug", "info", "warning", "error", "critical"} else "info",
    )
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
