"""``llm-core conformance``: certify model x backend pairs, verify certificates, replay failures.

Plugged into the ``llm-core`` command by the entry point ``llm_core.commands: conformance``
(the engine does not import the suite).

    llm-core conformance [--backend NAME ...] [--model NAME ...] [--dtype D ...] [--report DIR]
    llm-core conformance verify FILE [--key PUBLIC.pem]
    llm-core conformance replay --backend NAME --op OP --case N --dtype D --seed S [--traceback]
    llm-core conformance replay BUNDLE [--backend NAME]
    llm-core conformance diff --model M --backend NAME [--against NAME|reference] [--dump DIR]
    llm-core conformance keygen DIR

A run covers every installed backend by default (those that cannot run here are listed as
NOT RUN with the reason), every architecture the engine supports (tiny random-weight
checkpoints) and the demo model, in each backend's serving dtypes (float32, bfloat16 and
float16, less those it substitutes: the CPU serves fp16 checkpoints in bf16). The exit status
is 0 when every cell that ran is CERTIFIED and no operator failed, 1 otherwise, 2 when nothing
could run.
See docs/conformance.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

#: Path of an Ed25519 private key (PEM) to sign certificates with, when --sign-key is not given.
ENV_SIGN_KEY = "LLM_CORE_CONFORMANCE_SIGN_KEY"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``conformance`` command (and its verify/replay/diff/keygen subcommands)."""
    parser = subparsers.add_parser(
        "conformance",
        help="certify model x backend pairs against the reference; verify certificates",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(parser)
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="conformance_command", metavar="SUBCOMMAND")
    sub.required = False

    verify = sub.add_parser("verify", help="check a certificate's digest, signature and coverage")
    verify.add_argument("file", type=pathlib.Path, help="the certificate (JSON)")
    verify.add_argument("--key", type=pathlib.Path, help="the signer's Ed25519 public key (PEM)")
    verify.add_argument(
        "--allow-partial",
        action="store_true",
        help="accept a certificate that did not run the whole mandatory set",
    )
    verify.set_defaults(func=run_verify)

    replay = sub.add_parser(
        "replay",
        help="rerun one operator case of a run, or the call of a diff's replay bundle",
        description="Either `replay --backend NAME --op OP --case N [--dtype D] [--seed S]`: "
        "one operator case of a run, with details; or `replay BUNDLE [--backend NAME]`: the "
        "call in a bundle written by `diff --dump`, on the backend it was recorded on (or "
        "NAME) and on the float64 reference.",
    )
    replay.add_argument(
        "bundle", nargs="?", type=pathlib.Path, help="a replay bundle directory (diff --dump)"
    )
    replay.add_argument("--backend", help="backend name (a bundle: default the recorded one)")
    replay.add_argument("--op", help="operator name, as in the report")
    replay.add_argument("--case", type=int, help="case number, as in the report")
    replay.add_argument("--dtype", default="float32", help="dtype of the case (default float32)")
    replay.add_argument("--seed", type=int, default=1234, help="the run's seed (default 1234)")
    replay.add_argument(
        "--traceback",
        action="store_true",
        help="when the case raises, print the exception's full Python traceback (the case "
        "runs once more to catch it)",
    )
    replay.set_defaults(func=run_replay)

    diff = sub.add_parser(
        "diff",
        help="find the first operator where a backend diverges from another (or the reference)",
        description="Serve the same greedy request on --backend and on --against with every "
        "HAL call recorded; rerun each call of the candidate with its own inputs on the "
        "float64 reference (and on --against) and report the first one out of its "
        "operator's tolerance, the side that is wrong, its layer and token position, and "
        "the first generated token that differs. Exit status: 0 no divergence, 1 a "
        "divergence (or a side raised), 2 the diff cannot run here.",
    )
    diff.add_argument(
        "--model", required=True, help="architecture (llama), smollm2, gemma3-270m, or a path"
    )
    diff.add_argument("--backend", required=True, help="the candidate backend")
    diff.add_argument(
        "--against",
        default="reference",
        help="the other side: a backend name (same dtype), or reference (the HAL reference in "
        "float64; the default)",
    )
    diff.add_argument("--dtype", default="float32", help="the candidate's dtype (default float32)")
    diff.add_argument("--prompt", help="prompt text (default: a fixed English sentence)")
    diff.add_argument(
        "--max-tokens", type=int, default=4, help="tokens to generate greedily (default 4)"
    )
    diff.add_argument("--seed", type=int, default=1234, help="seed of the tiny checkpoints")
    diff.add_argument(
        "--report", type=pathlib.Path, metavar="DIR", help="write NAME.json and NAME.html here"
    )
    diff.add_argument("--report-name", default="diff", help="file name stem (default diff)")
    diff.add_argument(
        "--dump",
        type=pathlib.Path,
        metavar="DIR",
        help="write the diverging call as a replay bundle into DIR (and the --keep-op calls "
        "into DIR/kept)",
    )
    diff.add_argument(
        "--keep-op",
        action="append",
        default=[],
        metavar="OP[@LAYER]",
        help="also keep the tensors of these calls as bundles (needs --dump; repeatable)",
    )
    diff.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    diff.set_defaults(func=run_diff)

    mutants = sub.add_parser(
        "mutants",
        help="mutation testing of the op suite: every reference mutant must be killed",
        description="Run the op suite against mutants of the reference operators (one "
        "change each) and report the kill rate; exit 1 if an output-changing mutant survives.",
    )
    _add_mutation_arguments(mutants)
    mutants.set_defaults(func=run_mutants)

    keygen = sub.add_parser("keygen", help="create an Ed25519 key pair for signing certificates")
    keygen.add_argument("directory", type=pathlib.Path, help="where NAME.key and NAME.pub go")
    keygen.add_argument(
        "--name", default="conformance", help="file name stem (default conformance)"
    )
    keygen.set_defaults(func=run_keygen)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="backend to certify (repeat or comma-separate; default: every installed backend)",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="architecture (LlamaForCausalLM or llama), a real model (smollm2, the demo model; "
        "gemma3-270m), or a checkpoint path (repeat or comma-separate; default: every supported "
        "architecture and every real model)",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        metavar="D",
        help="float32, bfloat16, float16 (repeat or comma-separate; default: each backend's "
        "serving dtypes)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of every input (default 1234)")
    parser.add_argument(
        "--report",
        type=pathlib.Path,
        metavar="DIR",
        help="write the certificate, Markdown, HTML and JUnit reports here",
    )
    parser.add_argument(
        "--report-name",
        default="conformance",
        metavar="NAME",
        help="file name stem of the reports (default conformance)",
    )
    parser.add_argument(
        "--junit",
        type=pathlib.Path,
        metavar="FILE",
        help="JUnit XML path (default DIR/NAME-junit.xml)",
    )
    parser.add_argument(
        "--sign-key",
        type=pathlib.Path,
        metavar="FILE",
        help=f"Ed25519 private key (PEM) to sign the certificate (or ${ENV_SIGN_KEY})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a subset of the operator cases, no real models, one audit: for "
        "development, never a certification",
    )
    parser.add_argument(
        "--no-real-model",
        action="store_true",
        help="skip the real models (smollm2, gemma3-270m): no fetch, tiny checkpoints only",
    )
    parser.add_argument("--no-audits", action="store_true", help="skip the engine audits")
    parser.add_argument(
        "--op",
        action="append",
        metavar="OP",
        help="only these operators at the operator level (repeatable)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    from llm_conformance import Conformance, console, sign, write_reports

    if str(getattr(args, "log_level", "INFO")).upper() != "DEBUG":
        # The suite builds dozens of engines: their load messages would bury the results.
        logging.getLogger("llm_core.engine").setLevel(logging.WARNING)

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    with Conformance(
        backends=_split(args.backend),
        models=_split(args.model),
        dtypes=_split(args.dtype),
        seed=args.seed,
        quick=args.quick,
        real_model=not args.no_real_model,
        audits=not args.no_audits,
        ops=_split(args.op),
        progress=progress,
    ) as conformance:
        certificate = conformance.run()
    key_path = args.sign_key or (
        pathlib.Path(os.environ[ENV_SIGN_KEY]) if os.environ.get(ENV_SIGN_KEY) else None
    )
    if key_path is not None:
        certificate = sign(certificate, key_path.read_bytes())
    print(console(certificate))
    if args.report is not None:
        for path in write_reports(certificate, args.report, args.report_name, args.junit):
            print(f"wrote {path}")
    return int(certificate["summary"]["exit_status"])


def run_verify(args: argparse.Namespace) -> int:
    from llm_conformance import load, verify

    document = load(args.file)
    key = args.key.read_bytes() if args.key else None
    for line in verify(document, key, require_complete=not args.allow_partial):
        print(f"ok: {line}")
    summary = document.get("summary", {})
    print(
        f"{args.file}: valid. {summary.get('CERTIFIED', 0)} certified, "
        f"{summary.get('FAILED', 0)} failed, {summary.get('UNSUPPORTED', 0)} unsupported, "
        f"{summary.get('NOT RUN', 0)} not run"
    )
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from llm_hal import DType, get_registry

    from llm_conformance.replay import explain, raised_traceback, replay

    if args.bundle is not None:
        return _replay_bundle(args)
    missing = [f"--{n}" for n in ("backend", "op", "case") if getattr(args, n) is None]
    if missing:
        raise ValueError(
            f"replay needs {', '.join(missing)} (or a bundle directory: replay BUNDLE)"
        )
    backend = get_registry().create(args.backend)
    dtype = DType.parse(args.dtype)
    result = replay(backend, args.op, args.case, dtype, args.seed)
    print(explain(result, args.backend))
    if args.traceback and result.error:
        trace = raised_traceback(backend, args.op, args.case, dtype, args.seed)
        if trace is None:
            print("  traceback: none, the case raised nothing when run again")
        else:
            print("  traceback:\n" + trace, end="")
    return 0 if result.status != "failed" else 1


def _replay_bundle(args: argparse.Namespace) -> int:
    from llm_hal import get_registry

    from llm_conformance.replay import explain_bundle, replay_bundle

    backend = get_registry().create(args.backend) if args.backend else None
    result = replay_bundle(args.bundle, backend)
    print(explain_bundle(result))
    return 1 if result.failed else 0


def run_diff(args: argparse.Namespace) -> int:
    from llm_conformance.diff import Diff, DiffError
    from llm_conformance.diff_report import console, write

    if str(getattr(args, "log_level", "INFO")).upper() != "DEBUG":
        logging.getLogger("llm_core.engine").setLevel(logging.WARNING)

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        diff = Diff(
            args.model,
            args.backend,
            args.against,
            args.dtype,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            seed=args.seed,
            keep_ops=args.keep_op,
            keep_dir=args.dump,
            progress=progress,
        )
        record = diff.run()
    except DiffError as exc:
        print(f"llm-core conformance diff: cannot run: {exc}", file=sys.stderr)
        return 2
    if args.dump is not None:
        bundle = diff.dump(args.dump)
        record["bundle"] = str(bundle) if bundle else None
    print(console(record))
    if args.dump is not None:
        print(
            f"replay bundle: {record['bundle']} (llm-core conformance replay {record['bundle']})"
            if record["bundle"]
            else f"no divergence: nothing dumped into {args.dump}"
        )
    elif record["verdict"]["diverged"]:
        print("add --dump DIR to write the diverging call as a replay bundle")
    if args.report is not None:
        for path in write(record, args.report, args.report_name):
            print(f"wrote {path}")
    failed = record["verdict"]["diverged"] or record["verdict"]["errors"]
    return 1 if failed else 0


def run_keygen(args: argparse.Namespace) -> int:
    from llm_conformance import generate_keypair

    private, public = generate_keypair(args.directory, args.name)
    print(f"private key (keep it secret): {private}\npublic key (publish it): {public}")
    return 0


def _add_mutation_arguments(parser: argparse.ArgumentParser) -> None:
    from llm_conformance.mutation import add_arguments

    add_arguments(parser)


def run_mutants(args: argparse.Namespace) -> int:
    from llm_conformance.mutation import run

    return run(args)
