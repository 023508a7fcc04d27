"""``llm-core bench``: the latency and throughput commands on a tiny random-weight checkpoint,
with tiny sizes, end to end through the CLI; the JSON report holds every promised figure and
the figures agree with what was asked (token counts, request counts, ordered percentiles)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core.benchmarks import LatencySummary, RequestTimeline, RunResult, combine
from llm_core.cli import main

LATENCY_KEYS = ("count", "mean", "median", "p90", "p99", "min", "max", "std")
FIGURES = ("request_throughput", "output_throughput", "total_token_throughput", "duration_s",
           "peak_rss_bytes", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("bench") / "tiny-llama"
    save_tiny_hf_checkpoint(path, "llama")
    return path


def _bench(tmp_path: pathlib.Path, *argv: str) -> dict:
    out = tmp_path / "report.json"
    code = main(["bench", *argv, "--dtype", "float32", "--no-roofline", "--no-progress",
                 "--output-json", str(out)])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def _check_figures(figures: dict, requests: int, input_len: int, output_len: int) -> None:
    for key in FIGURES:
        assert key in figures, key
    assert figures["completed"] == requests and figures["failed"] == 0
    assert figures["total_output_tokens"] == requests * output_len
    assert figures["total_input_tokens"] == requests * input_len
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = figures[metric]
        assert set(LATENCY_KEYS) <= set(s)
        assert 0 < s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"]
    assert figures["e2e_ms"]["median"] >= figures["ttft_ms"]["median"]
    assert figures["output_throughput"] > 0 and figures["peak_rss_bytes"] > 0


def test_bench_latency_reports_every_figure(
    tiny_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    report = _bench(tmp_path, "latency", "--model", str(tiny_model), "--input-len", "12",
                    "--output-len", "5", "--batch-size", "1,3", "--num-iters", "2",
                    "--num-iters-warmup", "1")  # fmt: skip
    assert report["command"] == "latency"
    results = report["results"]
    assert [(r["system"], r["batch_size"]) for r in results] == [("llm-core", 1), ("llm-core", 3)]
    for r in results:
        _check_figures(r["figures"], r["batch_size"], 12, 5)
        assert r["figures"]["num_iters"] == 2 and len(r["iterations"]) == 2
    assert report["environment"]["backend"] == "cpu"
    assert report["ratios"] == []


def test_bench_throughput_with_concurrency_and_rate(
    tiny_model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    report = _bench(tmp_path, "throughput", "--model", str(tiny_model), "--input-len", "8",
                    "--output-len", "4", "--num-prompts", "5", "--concurrency", "2",
                    "--request-rate", "200", "--num-iters", "1",
                    "--num-iters-warmup", "0")  # fmt: skip
    (result,) = report["results"]
    assert result["concurrency"] == 2
    _check_figures(result["figures"], 5, 8, 4)
    assert report["config"]["request_rate"] == 200


def test_bench_baseline_hf_gives_a_ratio(tiny_model: pathlib.Path, tmp_path: pathlib.Path) -> None:
    report = _bench(tmp_path, "latency", "--model", str(tiny_model), "--input-len", "6",
                    "--output-len", "3", "--num-iters", "1", "--num-iters-warmup", "0",
                    "--baseline", "hf")  # fmt: skip
    systems = [r["system"] for r in report["results"]]
    assert systems == ["llm-core", "transformers"]
    _check_figures(report["results"][1]["figures"], 1, 6, 3)
    (ratio,) = report["ratios"]
    assert ratio["baseline"] == "transformers" and ratio["output_throughput"] > 0


def test_timeline_figures_from_known_timestamps() -> None:
    # arrival 0, tokens at 1.0, 1.5, 2.5: TTFT 1 s, TPOT 0.75 s, ITLs 0.5 and 1.0 s, E2E 2.5 s.
    t = RequestTimeline(prompt_len=4, arrival=0.0)
    for when in (1.0, 1.5, 2.5):
        t.add_tokens(1, when)
    figures = RunResult([t], duration=2.5).figures()
    assert figures["ttft_ms"]["median"] == pytest.approx(1000)
    assert figures["tpot_ms"]["median"] == pytest.approx(750)
    assert figures["itl_ms"]["count"] == 2 and figures["itl_ms"]["max"] == pytest.approx(1000)
    assert figures["e2e_ms"]["median"] == pytest.approx(2500)
    assert figures["output_throughput"] == pytest.approx(3 / 2.5)
    s = LatencySummary.of(range(1, 101))
    assert (s.median, s.p90, s.p99) == pytest.approx((50.5, 90.1, 99.01))
    runs = [{"x": 1.0, "peak_rss_bytes": 5, "s": {"m": 3.0}}, {"x": 3.0, "peak_rss_bytes": 7,
            "s": {"m": 1.0}}, {"x": 2.0, "peak_rss_bytes": 6, "s": {"m": 2.0}}]  # fmt: skip
    assert combine(runs) == {"x": 2.0, "peak_rss_bytes": 7, "s": {"m": 2.0}, "num_iters": 3}
    assert math.isnan(RunResult([], 0.0).figures()["output_throughput"])
