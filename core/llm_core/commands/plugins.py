"""``llm-core plugins``: every discovered backend, whether it can run here, and its operators.

Each backend found through the ``llm_core.backends`` entry point is listed, the broken ones
included: its package, HAL API version, priority, availability (or why not), devices and
memory, and which HAL operators it implements itself, inherits from the reference, or lacks
(those would need the opt-in per-operator fallback). ``--json`` prints the same as one JSON
document. The exit status is 0 when at least one backend can run here, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llm_hal import HAL_API_VERSION, OPS, BackendRecord, Registry, get_registry
from llm_hal.backend import Backend

GIB = float(1 << 30)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``plugins`` command on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "plugins",
        help="list the installed backends and the operators each supports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--all-ops",
        action="store_true",
        help="show every HAL operator of every backend: native, reference or unsupported",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    document = collect()
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_tables(document, all_ops=args.all_ops)
    return 0 if any(b["available"] for b in document["backends"]) else 1


# -------------------------------------------------------------------------------------------
# what is installed
# -------------------------------------------------------------------------------------------


def collect(registry: Registry | None = None) -> dict[str, Any]:
    """The report as plain data: what ``--json`` prints."""
    registry = registry or get_registry()
    try:
        automatic: str | None = registry.choose().name
    except Exception:  # nothing can run: each backend's entry says why
        automatic = None
    return {
        "hal_api_version": HAL_API_VERSION,
        "automatic_choice": automatic,
        "backends": [_describe(registry, registry.records[n]) for n in registry.names()],
    }


def _describe(registry: Registry, record: BackendRecord) -> dict[str, Any]:
    spec = record.spec
    entry: dict[str, Any] = {
        "name": record.name,
        "distribution": record.distribution,
        "distribution_version": record.dist_version,
        "entry_point": record.entry_point,
        "plugin_version": spec.version if spec else None,
        "hal_api_version": spec.api_version if spec else None,
        "priority": spec.priority if spec else None,
        "description": spec.description if spec else "",
        "load_error": record.error or None,
        "allowed": True,
        "available": False,
        "reason": None,
        "devices": [],
        "memory": None,
        "ops": None,
        "error": None,
    }
    allowed, why = registry.allowed(record.name)
    if not allowed:
        entry.update(allowed=False, reason=why)
        return entry
    availability = record.availability()
    entry["available"] = availability.available
    entry["reason"] = availability.reason or None
    entry["devices"] = [
        {
            "index": d.index,
            "name": d.name,
            "memory_gib": round(d.total_memory / GIB, 2) if d.total_memory else None,
            "properties": dict(d.properties),
        }
        for d in availability.devices
    ]
    if not availability.available:
        return entry
    try:
        backend = registry.create(record.name)
        memory = backend.memory_info()
        entry["memory"] = {
            "total_gib": round(memory.total / GIB, 2),
            "free_gib": round(memory.free / GIB, 2),
        }
        entry["ops"] = _classify_ops(backend)
    except Exception as exc:  # a broken backend is reported, never fatal to the listing
        entry["error"] = f"{type(exc).__name__}: {exc}"
    return entry


def _classify_ops(backend: Backend) -> dict[str, list[str]]:
    """Each HAL operator as native (the backend's own), reference (inherited) or unsupported."""
    native = backend.native_ops()
    ops: dict[str, list[str]] = {"native": [], "reference": [], "unsupported": []}
    for op in OPS:
        if not backend.supports(op):
            ops["unsupported"].append(op)
        else:
            ops["native" if op in native else "reference"].append(op)
    return ops


# -------------------------------------------------------------------------------------------
# tables
# -------------------------------------------------------------------------------------------


def _status(b: dict[str, Any]) -> tuple[str, str]:
    """A short status for the table, and the reason printed in full below it."""
    if b["load_error"]:
        return "[red]failed to load[/]", b["load_error"]
    if b["error"]:
        return "[red]broken[/]", b["error"]
    if b["available"]:
        return "[green]available[/]", ""
    if not b["allowed"]:
        return "[yellow]disabled[/]", b["reason"]
    return "[red]unavailable[/]", b["reason"]


def _devices(b: dict[str, Any]) -> list[str]:
    lines = [
        f"device {d['index']}: {d['name']}"
        + (f", {d['memory_gib']:.1f} GiB" if d["memory_gib"] else "")
        for d in b["devices"]
    ]
    if b["memory"]:
        lines.append(
            f"memory: {b['memory']['free_gib']:.1f} of {b['memory']['total_gib']:.1f} GiB free"
        )
    return [_escape(line) for line in lines]


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _print_tables(document: dict[str, Any], all_ops: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    backends = document["backends"]
    table = Table(
        title=f"llm-core backends (HAL API {document['hal_api_version']})",
        caption="operators: native / from the reference / unsupported",
    )
    for column in ("backend", "package", "HAL API", "priority", "status", "operators"):
        table.add_column(column, overflow="fold")
    for b in backends:
        ops = b["ops"]
        table.add_row(
            _escape(b["name"]),
            _escape(f"{b['distribution']} {b['distribution_version']}"),
            _escape(b["hal_api_version"] or "?"),
            "-" if b["priority"] is None else str(b["priority"]),
            _status(b)[0],
            f"{len(ops['native'])}/{len(ops['reference'])}/{len(ops['unsupported'])}"
            if ops
            else "-",
        )
    console.print(table)
    for b in backends:
        status, reason = _status(b)
        console.print(
            f"[bold]{_escape(b['name'])}[/]: {status}" + (f": {_escape(reason)}" if reason else "")
        )
        for line in _devices(b):
            console.print(f"  {line}")
        if b["ops"] and not all_ops:
            console.print("  native: " + (", ".join(b["ops"]["native"]) or "none"))
            if b["ops"]["unsupported"]:
                console.print("  [red]unsupported[/]: " + ", ".join(b["ops"]["unsupported"]))
    if not backends:
        console.print("No backend is installed: `pip install llm-core` provides the cpu backend.")
    choice = document["automatic_choice"]
    console.print(
        f"Automatic choice: [bold]{_escape(choice)}[/]"
        if choice
        else "[red]No backend can run here.[/]"
    )
    with_ops = [b for b in backends if b["ops"]]
    if all_ops and with_ops:
        matrix = Table(title="HAL operators")
        matrix.add_column("operator")
        for b in with_ops:
            matrix.add_column(_escape(b["name"]))
        style = {"native": "[green]native[/]", "reference": "reference", "unsupported": "[red]-[/]"}
        for op in OPS:
            cells = [
                next(style[k] for k, names in b["ops"].items() if op in names) for b in with_ops
            ]
            matrix.add_row(op, *cells)
        console.print(matrix)


def main(argv: list[str] | None = None) -> int:
    """Run the command on its own: ``python -m llm_core.commands.plugins [--json]``."""
    parser = argparse.ArgumentParser(prog="llm-core")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plugins", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
