"""Mutation testing of the operator suite: how many plausible one-line bugs does it catch?

Every mutant of :mod:`llm_conformance.mutants` (the reference backend with one method changed)
is run through the suite's cases of the one operator it breaks, cheapest case first, and it is
*killed* when the suite FAILS that operator. A mutant declared equivalent (no valid input tells
it from the reference within the tolerance table) must pass every case, and in float64 too
where the operator runs in it: otherwise the claim is wrong and the pass says so.

    llm-core conformance mutants [--op OP ...] [--mutant NAME ...] [--seed S] [-v] [--list]
    python -m llm_conformance.mutation

The kill rate is killed / (mutants - equivalent); the exit status is 1 when a mutant that is
not declared equivalent survives, or one declared equivalent is killed, 2 for a bad selection.
See docs/conformance.md, "Mutation testing".
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from llm_hal import DType, TorchBackend

from llm_conformance.cases import FP32_ONLY, specs
from llm_conformance.mutants import MUTANTS, Mutant
from llm_conformance.opsuite import FAILED, CaseResult, checked_ops, run_case
from llm_conformance.tolerances import SUITE_VERSION

FP32, FP64 = DType.FP32, DType.FP64
KILLED, SURVIVED, EQUIVALENT, MISDECLARED = "killed", "survived", "equivalent", "misdeclared"


@dataclass(slots=True)
class Outcome:
    """What the suite made of one mutant; ``case`` is the case that failed, if one did."""

    mutant: Mutant
    status: str  # killed, survived, equivalent or misdeclared
    detail: str = ""
    seconds: float = 0.0
    case: CaseResult | None = None


_ORDER: dict[tuple[str, DType, int], list[int]] = {}


def case_order(op: str, dtype: DType, seed: int) -> list[int]:
    """The cases of ``op``, cheapest first (so a killed mutant costs little), timed once on
    the unmutated reference, which must pass every one of them."""
    key = (op, dtype, seed)
    if key not in _ORDER:
        reference, spec = TorchBackend("cpu"), specs()[op]
        timed = []
        for index in range(len(spec.cases)):
            case = run_case(reference, spec, index, dtype, seed)
            if case.status == FAILED:
                raise RuntimeError(
                    f"the unmutated reference fails {op} case {index} ({dtype.value}): "
                    f"{case.summary()}"
                )
            timed.append((case.seconds, index))
        _ORDER[key] = [index for _, index in sorted(timed)]
    return _ORDER[key]


def run_mutant(m: Mutant, seed: int, cases: Sequence[int] | None = None) -> Outcome:
    """Run the mutant through its operator's cases (``cases``, or all of them cheapest
    first), in each of its dtypes, until one fails."""
    dtypes = list(m.dtypes)
    if m.op in FP32_ONLY:
        dtypes = [FP32]
    elif m.equivalent and FP64 not in dtypes:
        dtypes.append(FP64)  # where rounding hides nothing
    orders = {d: list(cases) if cases is not None else case_order(m.op, d, seed) for d in dtypes}
    start = time.perf_counter()
    backend = m.backend()
    spec = specs()[m.op]
    worst = 0.0
    for dtype in dtypes:
        for index in orders[dtype]:
            case = run_case(backend, spec, index, dtype, seed)
            seconds = time.perf_counter() - start
            if case.status == FAILED:
                detail = f"case {index} ({dtype.value}): {case.summary()}"
                if m.equivalent:
                    detail = "declared equivalent, yet " + detail
                    return Outcome(m, MISDECLARED, detail, seconds, case)
                return Outcome(m, KILLED, detail, seconds, case)
            if dtype is FP64:
                worst = max([worst, *(c.metrics.get("max_abs", 0.0) for c in case.checks)])
    seconds = time.perf_counter() - start
    if m.equivalent:
        where = "" if m.op in FP32_ONLY else f"; max |mutant - oracle| in float64: {worst:.3g}"
        return Outcome(m, EQUIVALENT, m.equivalent + where, seconds)
    tried = ", ".join(d.value for d in dtypes)
    count = len(orders[dtypes[0]])
    return Outcome(m, SURVIVED, f"passed all {count} cases in {tried}", seconds)


def select(ops: Iterable[str] = (), names: Iterable[str] = ()) -> list[Mutant]:
    """The mutants of the given operators (all if none) whose name or id is in ``names``
    (all if none)."""
    ops, names = set(ops), set(names)
    return [
        m
        for m in MUTANTS
        if (not ops or m.op in ops) and (not names or m.name in names or m.id in names)
    ]


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """The per-operator table and the kill rate, as lines (misdeclared count as survived)."""
    rows = [f"{'operator':26} {'mutants':>7} {'killed':>7} {'equivalent':>10} {'survived':>8}"]
    totals = dict.fromkeys((KILLED, EQUIVALENT, SURVIVED, MISDECLARED), 0)
    for op in checked_ops():
        mine = [o for o in outcomes if o.mutant.op == op]
        if not mine:
            continue
        n = {s: sum(o.status == s for o in mine) for s in totals}
        for s in totals:
            totals[s] += n[s]
        survived = n[SURVIVED] + n[MISDECLARED]
        rows.append(f"{op:26} {len(mine):7} {n[KILLED]:7} {n[EQUIVALENT]:10} {survived:8}")
    total = len(outcomes)
    survived = totals[SURVIVED] + totals[MISDECLARED]
    rows.append(f"{'total':26} {total:7} {totals[KILLED]:7} {totals[EQUIVALENT]:10} {survived:8}")
    changing = total - totals[EQUIVALENT]
    rate = 100.0 * totals[KILLED] / changing if changing else 100.0
    rows.append("")
    rows.append(
        f"kill rate: {totals[KILLED]} / {changing} = {rate:.1f}% of the mutants that change an "
        f"output ({totals[EQUIVALENT]} equivalent)"
    )
    return rows


def run_pass(
    mutants: Sequence[Mutant], seed: int, verbose: bool = False, out: TextIO | None = None
) -> int:
    """Run every mutant and print the table; 1 if one survived or was wrongly declared
    equivalent, else 0."""
    out = out or sys.stdout
    print(
        f"Mutation testing of the operator suite (suite {SUITE_VERSION}, seed {seed}): "
        f"{len(mutants)} mutants of the reference operators",
        file=out,
        flush=True,
    )
    start = time.perf_counter()
    outcomes = []
    for m in mutants:
        outcome = run_mutant(m, seed)
        outcomes.append(outcome)
        if verbose or outcome.status in (SURVIVED, MISDECLARED):
            detail = outcome.detail if len(outcome.detail) < 160 else outcome.detail[:157] + "..."
            line = f"  {outcome.status:11} {m.id:45} {outcome.seconds:5.1f}s  {detail}"
            print(line, file=out, flush=True)
    print("", *table(outcomes), sep="\n", file=out)
    equivalents = [o for o in outcomes if o.status == EQUIVALENT]
    if equivalents:
        print("\nequivalent mutants:", file=out)
        for o in equivalents:
            print(f"  {o.mutant.id} ({o.mutant.what}): {o.detail}", file=out)
    bad = [o for o in outcomes if o.status in (SURVIVED, MISDECLARED)]
    for o in bad:
        print(f"\n{o.status.upper()}: {o.mutant.id} ({o.mutant.what}): {o.detail}", file=out)
    print(f"\n{time.perf_counter() - start:.0f} s", file=out)
    return 1 if bad else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llm-core conformance mutants``."""
    parser.add_argument("--op", action="append", default=[], help="only this operator's mutants")
    parser.add_argument(
        "--mutant", action="append", default=[], help="only this mutant (name or op/name)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="suite seed (default 1234)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per mutant")


def run(args: argparse.Namespace) -> int:
    """Run the pass for parsed arguments (see :func:`add_arguments`); the exit status."""
    chosen = select(args.op, args.mutant)
    unknown = sorted(set(args.op) - {m.op for m in MUTANTS})
    if unknown or not chosen:
        what = f"operator {', '.join(unknown)}" if unknown else ", ".join(args.mutant)
        print(f"no mutants for {what}; see --list", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id:50} {m.what}" + (" [equivalent]" if m.equivalent else ""))
        return 0
    return run_pass(chosen, args.seed, args.verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llm_conformance.mutation [OPTIONS]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="llm-core conformance mutants",
        description="Mutation testing of the operator suite against the reference operators.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
