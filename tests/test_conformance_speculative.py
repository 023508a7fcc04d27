"""The speculative-decoding engine audit: it runs in every cell with the other audits, passes on
the correct engine, and catches a broken speculation.

The faults are planted the way the rest of the suite's fault tests plant them, in real code: a
verification that accepts proposals the target did not draw (wrong tokens), one that rejects
every proposal (right tokens, but speculation never engaged: the audit must not pass on a run
that proved nothing), and a draft model that disagrees with its target (right tokens, but a draft
equal to its target must have every proposal accepted).
"""

from __future__ import annotations

from typing import Any

import pytest
from llm_conformance import Conformance, markdown
from llm_conformance.audits import AUDITS, Auditor
from llm_conformance.checkpoints import TINY_VOCAB
from llm_conformance.models import ModelUnderTest, tiny_model_under_test
from llm_core.engine import draft_model, model_runner, speculative
from llm_core_cpu import CpuBackend
from llm_hal import DType

SEED = 1234
AUDIT = "speculative_decoding"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelUnderTest:
    directory = tmp_path_factory.mktemp("tiny-llama")
    return tiny_model_under_test("LlamaForCausalLM", directory, SEED)


def audit(model: ModelUnderTest) -> Any:
    (result,) = Auditor(CpuBackend(), model, DType.FP32, SEED).run((AUDIT,))
    return result


@pytest.mark.slow  # about 45 s: the cell's traced operators run in full (sample: 30 s)
def test_the_audit_runs_in_a_cell_and_passes() -> None:
    # `llm-core conformance --backend cpu --model LlamaForCausalLM --dtype float32`, in Python
    # (the operators the cell traces still run in full, whatever `ops` asks for).
    with Conformance(
        ["cpu"], ["LlamaForCausalLM"], ["float32"], seed=SEED, real_model=False, ops=["gelu"]
    ) as run:
        certificate = run.run()
    (cell,) = certificate["cells"]
    assert cell["status"] == "CERTIFIED", cell["reasons"]
    assert list(cell["audits"]) == list(AUDITS)
    spec = cell["audits"][AUDIT]
    assert spec["passed"], spec["detail"]
    assert spec["ngram_proposed"] > 0 and spec["ngram_accepted"] > 0
    assert spec["draft_proposed"] > 0 and spec["draft_accepted"] == spec["draft_proposed"]
    # Every extended prompt reused blocks holding tokens generated while speculating.
    assert all(hits >= 16 for hits in spec["ngram_cached"] + spec["draft_cached"])
    assert "every KV block released" in spec["detail"]
    assert f"{AUDIT} ok" in markdown(certificate)


def test_a_verification_that_accepts_wrong_proposals_fails_the_audit(
    tiny: ModelUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    def accept_all(proposals: list[int], draws: list[int]) -> list[int]:
        return [*proposals, draws[len(proposals)]]  # every proposal, then the bonus draw

    monkeypatch.setattr(model_runner, "accept_draws", accept_all)
    result = audit(tiny)
    assert not result.passed
    assert result.detail.startswith("ngram: prompt") and "differs at token" in result.detail


def test_a_verification_that_rejects_every_proposal_did_not_exercise_speculation(
    tiny: ModelUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_runner, "accept_draws", lambda proposals, draws: draws[:1])
    result = audit(tiny)
    assert not result.passed
    assert "did not exercise speculation" in result.detail
    assert result.metrics["ngram_proposed"] > 0 and result.metrics["ngram_accepted"] == 0


def test_a_draft_that_disagrees_with_its_target_fails_the_acceptance_check(
    tiny: ModelUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    propose = draft_model.DraftModelProposer.fill

    def off_by_one(self: draft_model.DraftModelProposer, items: list[Any]) -> None:
        propose(self, items)
        for item in items:  # the last proposal of each step: the next token id instead
            last = item.num_spec - 1
            item.seq.spec_token_ids[last] = (item.seq.spec_token_ids[last] + 1) % TINY_VOCAB

    monkeypatch.setattr(draft_model.DraftModelProposer, "fill", off_by_one)
    result = audit(tiny)
    assert not result.passed
    assert "a draft model equal to its target had" in result.detail and "not all" in result.detail
    assert result.metrics["draft_accepted"] < result.metrics["draft_proposed"]


def test_the_correct_engine_passes_the_audit_alone(tiny: ModelUnderTest) -> None:
    result = audit(tiny)
    assert result.passed, result.detail
    assert "every KV block released" in result.detail
    assert result.metrics["draft_accepted"] == result.metrics["draft_proposed"] > 0


def test_the_prompts_make_prompt_lookup_propose_at_once(tiny: ModelUnderTest) -> None:
    """The repeated prompt: its last tokens occurred before, so the n-gram proposer has a
    proposal from the first decode step, whatever the model generates."""
    repeated = tiny.audit_prompts[7] * 3
    assert len(speculative.ngram_propose(repeated, 4, 1, 4)) == 4
