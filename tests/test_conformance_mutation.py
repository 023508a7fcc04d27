"""The mutation pass of the operator suite (``llm_conformance.mutation``), on a sample.

The full pass (every mutant of ``llm_conformance.mutants``) is a command, not a test: it
takes minutes (docs/conformance.md, "Mutation testing"). Here one mutant per operator class
is killed with its operator named, an equivalent mutant is confirmed, a wrong equivalence
claim and a survivor are reported as such, and the catalogue covers every checked operator.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
from llm_conformance.cases import specs
from llm_conformance.mutants import MUTANTS, Mutant
from llm_conformance.mutation import (
    EQUIVALENT,
    KILLED,
    MISDECLARED,
    SURVIVED,
    main,
    run_mutant,
    run_pass,
    select,
)
from llm_conformance.opsuite import checked_ops
from llm_hal import DType, TorchBackend

SEED = 1234


def _support_cases() -> list[int]:
    return [i for i, p in enumerate(specs()["sample"].cases) if p["kind"] == "support"]


SAMPLE = [
    "from_host/ties-away",  # exact conversions
    "allocate_kv_cache/shared",
    "linear/w8a8-tensor-scale",  # linear
    "rms_norm/eps-outside-sqrt",  # norm
    "gemma_rms_norm/llama-rounding",  # norm: one rounding too many (bf16)
    "rotary_embedding/style-swapped",  # rotary
    "reshape_and_cache/pads-written",
    "paged_attention_prefill/exp-without-max",  # attention: the large-score cases
    "paged_attention_decode/gqa-head-mod",
    "silu_and_mul/input-as-contiguous",  # elementwise
    "scale/factor-unrounded",  # elementwise: the rounding-bias check (bf16)
    "soft_cap/clamp",
    "apply_penalties/presence-twice",
    "apply_token_bitmask/signed-test",
    "compute_logprobs/log-of-softmax",  # softmax
    "moe_route/topk-then-softmax",
    "sample/top-k-keeps-k-1",  # sampling: the support cases
    "all_gather/world-of-two",
]


@pytest.mark.parametrize("mutant_id", SAMPLE)
def test_a_mutant_is_killed_with_its_operator_named(mutant_id: str) -> None:
    """In its first dtype only, and on fewer cases where they are slow (the ``--quick`` cases
    of attention, the support cases of sampling): the pass runs all, in fp32 and bf16."""
    (m,) = select(names=[mutant_id])
    assert not m.equivalent
    m = dataclasses.replace(m, dtypes=m.dtypes[:1])
    cases = None
    if m.op == "sample":
        cases = _support_cases()
    elif m.op.startswith("paged_attention"):
        cases = specs()[m.op].quick_indices()
    outcome = run_mutant(m, SEED, cases)
    assert outcome.status == KILLED, outcome.detail
    assert outcome.case is not None and outcome.case.op == m.op
    assert f"--op {m.op} " in outcome.case.replay_command(m.backend().name, SEED)


def test_attention_without_the_maximum_dies_on_the_large_score_cases_only() -> None:
    (m,) = select(names=["paged_attention_decode/exp-without-max"])
    m = dataclasses.replace(m, dtypes=(DType.FP32,))
    spec = specs()[m.op]
    ordinary = [i for i, p in enumerate(spec.cases) if not p.get("scores") and not p.get("inject")]
    assert run_mutant(m, SEED, ordinary).status == SURVIVED
    large = [i for i, p in enumerate(spec.cases) if p.get("scores") == "large"]
    outcome = run_mutant(m, SEED, large)
    assert outcome.status == KILLED and "NaN parity" in outcome.detail


def test_an_equivalent_mutant_is_confirmed_in_float64_too() -> None:
    (m,) = select(names=["add/in-dtype"])
    outcome = run_mutant(m, SEED)
    assert outcome.status == EQUIVALENT
    assert "max |mutant - oracle| in float64: 0" in outcome.detail


def test_a_wrong_equivalence_claim_is_reported() -> None:
    (no_bias,) = select(names=["linear/no-bias"])
    claimed = Mutant("linear", "no-bias", no_bias.what, no_bias.methods, equivalent="it is not")
    outcome = run_mutant(claimed, SEED)
    assert outcome.status == MISDECLARED and "declared equivalent, yet case" in outcome.detail


def test_a_survivor_fails_the_pass() -> None:
    unchanged = Mutant("gelu", "unchanged", "the reference itself", (("gelu", TorchBackend.gelu),))
    out = io.StringIO()
    assert run_pass([unchanged], SEED, out=out) == 1
    text = out.getvalue()
    assert "SURVIVED: gelu/unchanged" in text
    assert "kill rate: 0 / 1 = 0.0%" in text


def test_the_command_prints_the_table_and_the_kill_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--op", "add", "--op", "gather_rows"]) == 0
    out = capsys.readouterr().out
    assert "add " in out and "gather_rows " in out
    assert "= 100.0% of the mutants that change an output (1 equivalent)" in out
    assert main(["--op", "no_such_op"]) == 2
    assert main(["--list", "--op", "sample"]) == 0
    assert "sample/top-p-drops-crossing" in capsys.readouterr().out


def test_the_catalogue_covers_every_checked_operator() -> None:
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids))
    assert {m.op for m in MUTANTS} == set(checked_ops())
    reference_methods = set(dir(TorchBackend))
    for m in MUTANTS:
        assert m.what and all(name in reference_methods for name, _ in m.methods), m.id
        assert set(m.dtypes) <= {DType.FP32, DType.BF16}, m.id
