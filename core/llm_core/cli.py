"""The ``llm-core`` command: the built-in subcommands, then those plugged in by entry points.

A distribution adds a subcommand by declaring an entry point in the group
:data:`COMMAND_GROUP` that names a function ``add_parser(subparsers)`` (the conformance
suite's ``llm-core conformance`` is one). A command that fails to load is reported when it is
used and never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import sys
from collections.abc import Callable, Sequence

from llm_core.commands import bench, generate, new_backend, plugins, serve

#: Built-in subcommand modules, each with ``add_parser(subparsers)``; listed in help order.
#: Each imports its heavy dependencies (fastapi, ...) only when it runs.
COMMANDS = (generate, serve, plugins, bench, new_backend)

#: Entry point group of subcommands contributed by other distributions.
COMMAND_GROUP = "llm_core.commands"

#: Commands that the project's own optional distributions provide, and how to get them.
OPTIONAL_COMMANDS = {
    "conformance": 'the conformance suite is not installed: pip install "llm-core[conformance]"',
}


def _plugged_commands() -> dict[str, Callable[[argparse._SubParsersAction], None] | str]:
    """``name -> add_parser`` for each loadable entry point, ``name -> why`` for a broken one."""
    found: dict[str, Callable[[argparse._SubParsersAction], None] | str] = {}
    for ep in sorted(md.entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            found[ep.name] = ep.load()
        except Exception as exc:  # a broken extension must not take the CLI down
            found[ep.name] = f"the command failed to load ({ep.value}): {type(exc).__name__}: {exc}"
    return found


def _unavailable(sub: argparse._SubParsersAction, name: str, why: str) -> None:
    # No option prefix: whatever follows the name is taken as is, and the reason is printed.
    parser = sub.add_parser(name, help=f"(unavailable) {why}", add_help=False, prefix_chars="\0")
    parser.add_argument("rest", nargs="*")

    def explain(args: argparse.Namespace) -> int:
        print(f"llm-core {name}: {why}", file=sys.stderr)
        return 2

    parser.set_defaults(func=explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-core",
        description="One LLM inference engine for heterogeneous hardware.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    plugged = _plugged_commands()
    for name, why in OPTIONAL_COMMANDS.items():
        plugged.setdefault(name, why)
    for name, add in plugged.items():
        if isinstance(add, str):
            _unavailable(sub, name, add)
        else:
            add(sub)
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
