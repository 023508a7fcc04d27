"""``llm-core bench`` with speculative decoding: the grounded workload, the acceptance figures
beside the decode rate, and the ``no-spec`` baseline with its ratio, end to end through the CLI
on the demo model (tiny sizes) and on a tiny random-weight checkpoint."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest
from conftest_loaders import build_tiny_tokenizer, save_tiny_hf_checkpoint
from llm_core.benchmarks.grounded import INSTRUCTIONS, GroundedPrompts
from llm_core.cli import main

K = 3
SPEC = f'{{"method": "ngram", "num_speculative_tokens": {K}}}'


def _bench(tmp_path: pathlib.Path, *argv: str) -> dict:
    out = tmp_path / "report.json"
    code = main(["bench", "latency", *argv, "--no-roofline", "--no-progress", "--num-iters",
                 "1", "--num-iters-warmup", "0", "--output-json", str(out)])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def _check_spec_figures(figures: dict) -> None:
    assert figures["spec_num_drafts"] > 0
    assert 0 <= figures["spec_num_accepted_tokens"] <= figures["spec_num_draft_tokens"]
    assert figures["spec_num_draft_tokens"] <= K * figures["spec_num_drafts"]
    assert 0.0 <= figures["spec_acceptance_rate"] <= 1.0
    assert 1.0 <= figures["spec_mean_acceptance_length"] <= K + 1
    per_pos = figures["spec_acceptance_per_pos"]
    assert list(per_pos) == [str(i) for i in range(K)]
    assert all(1.0 >= a >= b >= 0.0 for a, b in itertools.pairwise(per_pos.values()))
    # the mean acceptance length is one plus the per-position acceptance summed
    assert figures["spec_mean_acceptance_length"] == pytest.approx(1 + sum(per_pos.values()))
    assert figures["decode_tok_s"] > 0


def test_grounded_speculation_against_no_spec_on_the_demo_model(
    default_model_file: pathlib.Path, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _bench(tmp_path, "--model", str(default_model_file), "--workload", "grounded",
                    "--input-len", "96", "--output-len", "24", "--speculative-config", SPEC,
                    "--baseline", "no-spec")  # fmt: skip
    printed = " ".join(capsys.readouterr().out.split())
    spec, plain = report["results"]
    assert (spec["system"], plain["system"]) == ("llm-core", "llm-core no-spec")
    _check_spec_figures(spec["figures"])
    # A copy task: prompt lookup finds most of the answer in the prompt.
    assert spec["figures"]["spec_acceptance_rate"] > 0.3
    assert not any(key.startswith("spec_") for key in plain["figures"])
    assert report["environment"]["speculative_config"]["method"] == "ngram"
    [ratio] = report["ratios"]
    assert ratio["baseline"] == "llm-core no-spec" and ratio["decode_tok_s"] > 0
    assert "llm-core vs llm-core no-spec at batch_size 1: decode tok/s x" in printed
    assert "acceptance rate" in printed and "mean acceptance length" in printed
    assert "per position" in printed


def test_speculation_on_a_tiny_checkpoint(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "tiny-llama"
    save_tiny_hf_checkpoint(model, "llama")
    report = _bench(tmp_path, "--model", str(model), "--dtype", "float32", "--workload",
                    "grounded", "--input-len", "200", "--output-len", "24", "--batch-size", "2",
                    "--speculative-config", SPEC)  # fmt: skip
    [result] = report["results"]
    assert result["batch_size"] == 2 and result["figures"]["completed"] == 2
    _check_spec_figures(result["figures"])
    assert "grounded" in report["config"]["prompts"]


def test_no_spec_baseline_needs_a_speculative_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "latency", "--baseline", "no-spec", "--no-roofline"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("llm-core: error: --baseline no-spec") and "--speculative-config" in line


def test_grounded_prompts_fit_and_are_fresh_per_round() -> None:
    tokenizer = build_tiny_tokenizer()
    prompts = GroundedPrompts(tokenizer, input_len=300, seed=1)
    first = prompts.make(4, round=0)
    assert first == GroundedPrompts(tokenizer, input_len=300, seed=1).make(4, round=0)
    assert prompts.make(4, round=1) != first
    for ids in first:
        assert len(ids) <= 300
        text = str(tokenizer.decode(ids))
        assert any(instruction in text for instruction in INSTRUCTIONS)
        # the chat template's generation prompt ends the prompt
        assert text.rstrip().endswith("assistant")
    with pytest.raises(ValueError, match="too short for the grounded workload"):
        GroundedPrompts(tokenizer, input_len=20).make(1)


def test_grounded_prompts_from_a_paragraph_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "paragraphs.txt"
    path.write_text("Alpha beta gamma. Delta epsilon.\n\nZeta eta theta iota.\n")
    prompts = GroundedPrompts(build_tiny_tokenizer(), input_len=400, path=path)
    texts = [build_tiny_tokenizer().decode(ids) for ids in prompts.make(3)]
    # (words of five letters or more may carry a typo to fix)
    assert "gamma." in texts[0] and "epsilon." in texts[0]
    assert "iota." in texts[1] and "gamma." not in texts[1]
    assert "gamma." in texts[2]  # the file's paragraphs, cycled
    assert str(path) in prompts.describe()
