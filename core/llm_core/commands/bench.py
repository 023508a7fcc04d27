"""``llm-core bench latency | throughput | serve | soak``: measure the engine (in process, or a
running server over HTTP) and, with ``--baseline``, transformers and llama.cpp on the same
prompts; ``soak`` watches a server's memory and latency under a long steady load.

``latency``: batches of ``--batch-size`` prompts, all submitted at once, run to completion.
``throughput``: ``--num-prompts`` requests under a ``--concurrency`` cap and/or arriving at a
Poisson ``--request-rate``, through continuous batching. ``serve``: the same load sent to
``--base-url`` (``llm-core serve``) as streaming ``/v1/completions`` requests.

``--workload grounded`` sends chat requests that ask the model to repeat (or fix typos in) a
paragraph of the prompt, the workload of n-gram speculation; with ``--speculative-config`` and
``--baseline no-spec`` one command measures speculation against plain decoding.

Every level runs ``--num-iters-warmup`` warm-up and ``--num-iters`` measured iterations on
fresh prompts; figures are medians over the measured ones. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from llm_core.commands.generate import add_engine_arguments, engine_args_from


def _levels(text: str) -> list[int | None]:
    """``"1,8,32"`` as [1, 8, 32]; ``"all"`` (no cap) as [None]."""
    levels: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("all", "inf", "none", ""):
            levels.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number (or 'all')") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"levels must be >= 1, got {value}")
        levels.append(value)
    return levels


def _rate(text: str) -> float | None:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--request-rate must be > 0, got {value}")
    return None if value == float("inf") else value


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    g.add_argument("--output-len", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument(
        "--dataset",
        default=None,
        metavar="FILE",
        help="prompts from FILE (one per line, or JSONL with a 'prompt' field), cut to "
        "--input-len tokens; default: random tokens. With --workload grounded: the paragraphs",
    )
    g.add_argument(
        "--workload",
        choices=("random", "grounded"),
        default="random",
        help="random: token-id prompts (or --dataset), exactly --output-len tokens each "
        "(default); grounded: chat requests in the model's template asking to repeat a "
        "paragraph of about --input-len tokens or fix its typos, stopping at EOS (the "
        "input-grounded workload of speculative decoding)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random prompts and arrivals")
    g.add_argument("--num-iters", type=int, default=3, help="measured iterations (default 3)")
    g.add_argument("--num-iters-warmup", type=int, default=1, help="warm-up iterations (default 1)")
    out = p.add_argument_group("comparison and output")
    out.add_argument(
        "--baseline",
        action="append",
        choices=("hf", "llama-cpp", "no-spec"),
        default=[],
        help="also run transformers' generate (hf), llama.cpp through llama-cpp-python "
        "(llama-cpp, on the GGUF of the same model in the same dtype), or llm-core itself "
        "without --speculative-config (no-spec, iterations alternating with llm-core's) on "
        "the same prompts and print the ratio; repeatable",
    )
    out.add_argument(
        "--llama-cpp-model",
        default=None,
        metavar="GGUF",
        help="the GGUF file llama.cpp runs (default: the model's GGUF rewritten in the dtype)",
    )
    out.add_argument("--output-json", default=None, metavar="FILE", help="write every figure")
    out.add_argument(
        "--plot", default=None, metavar="FILE.png", help="latency percentiles and throughput"
    )
    out.add_argument("--no-roofline", action="store_true", help="skip the bandwidth/GEMM probes")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_guided(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guided decoding")
    what = g.add_mutually_exclusive_group()
    what.add_argument(
        "--guided-json",
        default=None,
        metavar="FILE",
        help="constrain every request to this JSON schema and report what the token masks "
        "cost per step (the grammar may end a request before --output-len)",
    )
    what.add_argument("--guided-regex", default=None, metavar="RE", help="likewise, a regex")


def _guided(args: argparse.Namespace) -> Any:
    from llm_core.sampling_params import GuidedDecodingParams

    if getattr(args, "guided_json", None):
        with open(args.guided_json) as f:
            return GuidedDecodingParams(json=f.read())
    if getattr(args, "guided_regex", None):
        return GuidedDecodingParams(regex=args.guided_regex)
    return None


def _add_load(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int, default=32, help="requests per iteration")
    g.add_argument(
        "--concurrency",
        type=_levels,
        default=[None],
        help="most requests in flight, or a list to sweep, e.g. 1,8,32 (default: no cap)",
    )
    g.add_argument(
        "--request-rate",
        type=_rate,
        default=None,
        help="Poisson arrival rate in requests/s (default: inf, all at once)",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``bench`` and its subcommands on the CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark latency, throughput or a running server",
        description="Measure llm-core (in process, or a running server over HTTP) and, with "
        "--baseline, transformers and llama.cpp on the same prompts.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="MODE")
    bench.set_defaults(func=lambda args: bench.print_help() or 2)

    latency = sub.add_parser(
        "latency",
        help="end-to-end latency of a batch (TTFT, TPOT, ITL, E2E)",
        description="Run batches of --batch-size prompts to completion; report latency figures.",
    )
    latency.add_argument(
        "--batch-size", type=_levels, default=[1], help="batch size, or a list (default 1)"
    )
    add_engine_arguments(latency)
    _add_common(latency)
    _add_guided(latency)
    latency.set_defaults(func=run_bench, max_num_seqs=None, max_model_len=None)

    throughput = sub.add_parser(
        "throughput",
        help="offline throughput under a concurrency cap or a request rate",
        description="Run --num-prompts requests through the engine's continuous batching.",
    )
    _add_load(throughput)
    add_engine_arguments(throughput)
    _add_common(throughput)
    _add_guided(throughput)
    throughput.set_defaults(func=run_bench, max_num_seqs=None, max_model_len=None)

    serve = sub.add_parser(
        "serve",
        help="drive a running llm-core (or any OpenAI-compatible) server over HTTP",
        description="Send streaming /v1/completions requests to --base-url and time the tokens.",
    )
    serve.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    serve.add_argument("--served-model", default=None, help="model name (default: the first)")
    serve.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    serve.add_argument(
        "--model",
        default=None,
        help="the model the server runs, for its tokenizer (random prompts) and the baselines "
        "(default: the demo model)",
    )
    _add_load(serve)
    _add_common(serve)
    serve.set_defaults(func=run_bench)

    soak = sub.add_parser(
        "soak",
        help="a long steady load on a server: memory, KV blocks and latency over time",
        description="Keep --concurrency streaming requests in flight for --duration seconds "
        "against --base-url, or against a `llm-core serve` it starts (with --model and "
        "--server-arg), and report the server's resident memory, KV blocks in use and latency "
        "every --interval seconds. Not for CI: a soak takes minutes by design.",
    )
    soak.add_argument("--base-url", default=None, help="a running server (default: start one)")
    soak.add_argument("--model", default=None, help="the model of the server it starts")
    soak.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for the `llm-core serve` it starts (repeatable)",
    )
    soak.add_argument("--api-key", default=None, help="bearer token, if the server wants one")
    soak.add_argument("--duration", type=float, default=1200, help="seconds (default 1200)")
    soak.add_argument("--interval", type=float, default=30, help="seconds per sample (30)")
    soak.add_argument("--concurrency", type=int, default=16, help="streams in flight (16)")
    soak.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    soak.add_argument("--output-len", type=int, default=128, help="tokens per request (128)")
    soak.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    soak.add_argument(
        "--warmup-intervals", type=int, default=2, help="samples left out of the verdict (2)"
    )
    soak.add_argument(
        "--flat-mib",
        type=float,
        default=64,
        help="resident memory counts as flat if it moves less than this after warm-up (64)",
    )
    soak.add_argument("--output-json", default=None, metavar="FILE", help="write every sample")
    soak.add_argument("--plot", default=None, metavar="FILE.png", help="memory and latency")
    soak.set_defaults(func=run_soak)


def run_bench(args: argparse.Namespace) -> int:
    from llm_core.benchmarks import BenchConfig, BenchRunner, EngineDriver, HttpDriver

    command = args.bench_command
    levels = args.batch_size if command == "latency" else args.concurrency
    config = BenchConfig(
        command=command,
        input_len=args.input_len,
        output_len=args.output_len,
        levels=levels,
        num_prompts=getattr(args, "num_prompts", 1),
        request_rate=getattr(args, "request_rate", None),
        num_iters=args.num_iters,
        num_iters_warmup=args.num_iters_warmup,
        dataset=args.dataset,
        workload=args.workload,
        seed=args.seed,
        baselines=list(dict.fromkeys(args.baseline)),
        llama_cpp_model=args.llama_cpp_model,
        roofline=not args.no_roofline,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if "no-spec" in config.baselines and not getattr(args, "speculative_config", None):
        raise ValueError(
            "--baseline no-spec compares llm-core with --speculative-config against the same "
            "engine without it: give --speculative-config (bench latency or throughput)"
        )
    engine: Any = None
    if command == "serve":
        from llm_core.loaders.opener import open_checkpoint

        driver: Any = HttpDriver(args.base_url, args.served_model, args.api_key)
        tokenizer = open_checkpoint(args.model).load_tokenizer()
        if config.baselines:
            engine = _load_engine(args, config)
    else:
        engine = _load_engine(args, config)
        driver = EngineDriver(engine, guided=_guided(args))
        tokenizer = engine.tokenizer
    report = BenchRunner(config, driver, tokenizer, engine).run()
    report.print()
    if args.output_json:
        report.write_json(args.output_json)
        print(f"wrote {args.output_json}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    failed = sum(r.figures.get("failed", 0) for r in report.results)
    return 1 if failed else 0


def run_soak(args: argparse.Namespace) -> int:
    from llm_core.benchmarks import HttpDriver
    from llm_core.benchmarks.prompts import BenchPrompts
    from llm_core.benchmarks.soak import SoakRunner, write_json, write_plot
    from llm_core.loaders.opener import open_checkpoint

    with contextlib.ExitStack() as stack:
        base_url = args.base_url or stack.enter_context(_started_server(args))
        driver = HttpDriver(base_url, None, args.api_key)
        prompts = BenchPrompts(open_checkpoint(args.model).load_tokenizer(), args.input_len,
                               args.seed)  # fmt: skip

        def show(s: Any) -> None:
            print(
                f"{s.t / 60:6.1f} min  RSS {s.rss_mib:8.1f} MiB  "
                f"KV blocks {s.kv_blocks_in_use:6.0f}  done {s.completed:4d}  "
                f"errors {s.errors}  TTFT p50/p99 "
                f"{s.ttft_ms['median']:.0f}/{s.ttft_ms['p99']:.0f} ms  TPOT p50/p99 "
                f"{s.tpot_ms['median']:.1f}/{s.tpot_ms['p99']:.1f} ms",
                flush=True,
            )

        runner = SoakRunner(
            driver, prompts, args.output_len, args.concurrency, args.duration, args.interval
        )
        report = runner.run(show)
    verdict = report.verdict(args.warmup_intervals, args.flat_mib)
    print(
        f"resident memory after warm-up: {verdict['rss_start_mib']:.1f} -> "
        f"{verdict['rss_end_mib']:.1f} MiB ({verdict['rss_growth_mib']:+.1f} MiB, "
        f"{verdict['rss_slope_mib_per_min']:+.2f} MiB/min): "
        f"{'flat' if verdict['rss_flat'] else 'NOT flat'}; {verdict['requests']} requests, "
        f"{verdict['errors']} errors"
    )
    if args.output_json:
        write_json(report, args.output_json, args.warmup_intervals, args.flat_mib)
        print(f"wrote {args.output_json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0 if verdict["rss_flat"] and not verdict["errors"] else 1


@contextlib.contextmanager
def _started_server(args: argparse.Namespace) -> Iterator[str]:
    """A `llm-core serve` subprocess on a free local port; its URL once it answers /health."""
    import socket
    import subprocess
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "llm_core.cli", "serve", "--port", str(port)]
    command += ([args.model] if args.model else []) + list(args.server_arg)
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 600 s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _load_engine(args: argparse.Namespace, config: Any) -> Any:
    """The engine, sized for the run when the user left the limits open: as many sequences as
    the largest level and a context of prompt + output, so the KV cache is no bigger than the
    run needs."""
    from llm_core.engine.llm_engine import LLMEngine

    if not hasattr(args, "max_num_seqs"):  # serve: the model is loaded for the baselines only
        args = argparse.Namespace(**vars(args), **_engine_defaults())
    if args.max_num_seqs is None:
        args.max_num_seqs = max(1, config.max_in_flight())
    if args.max_model_len is None:
        args.max_model_len = config.input_len + config.output_len + 16
    return LLMEngine(replace(engine_args_from(args), load_progress=config.progress))


def _engine_defaults() -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    defaults = vars(parser.parse_args([]))
    defaults.pop("model", None)
    return {**defaults, "max_num_seqs": None, "max_model_len": None}
