"""The ``llm-core`` command: one subcommand per module in ``llm_core.commands``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llm_core.commands import bench, conformance, generate, plugins, serve

#: Subcommand modules, each with ``add_parser(subparsers)``; listed in help order. Each
#: imports its heavy dependencies (fastapi, the suite, ...) only when it runs.
COMMANDS = (generate, serve, plugins, conformance, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-core",
        description="One LLM inference engine for heterogeneous hardware.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("llm_core", "llm_hal"):  # our own messages at the chosen level, others quiet
        logging.getLogger(name).setLevel(args.log_level.upper())
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"llm-core: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
