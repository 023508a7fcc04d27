"""``llm-core bench soak``: a short real soak against a server it starts on a tiny checkpoint,
and the verdict's arithmetic."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from llm_conformance.checkpoints import save_tiny_hf_checkpoint
from llm_core.benchmarks.soak import SoakReport, SoakSample, scrape

EMPTY = {"median": 0.0, "p99": 0.0}


def _sample(t: float, rss: float) -> SoakSample:
    return SoakSample(t, rss, 0.0, 10, 0, EMPTY, EMPTY)


def test_verdict_ignores_warmup_and_measures_growth() -> None:
    report = SoakReport({}, [_sample(30, 100), _sample(60, 400), _sample(90, 410),
                             _sample(120, 412), _sample(150, 411)])  # fmt: skip
    flat = report.verdict(warmup=1, flat_mib=16)
    assert flat["rss_start_mib"] == 400 and flat["rss_growth_mib"] == 11 and flat["rss_flat"]
    assert report.verdict(warmup=0, flat_mib=16)["rss_flat"] is False  # warm-up counted
    leaking = SoakReport({}, [_sample(60 * i, 400 + 20 * i) for i in range(1, 6)])
    verdict = leaking.verdict(warmup=1, flat_mib=16)
    assert not verdict["rss_flat"] and abs(verdict["rss_slope_mib_per_min"] - 20) < 1e-9


def test_scrape_reads_unlabelled_and_labelled_samples() -> None:
    text = (
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
        "process_resident_memory_bytes 2.5e+08\n"
        'llm_core_kv_cache_blocks_in_use{model_name="tiny"} 7.0\n'
    )
    assert scrape(text, "process_resident_memory_bytes") == 2.5e8
    assert scrape(text, "llm_core_kv_cache_blocks_in_use") == 7.0
    assert scrape(text, "process_resident") != scrape(text, "process_resident")  # nan: no match


def test_a_short_soak_against_a_server_it_starts(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "tiny-llama"
    save_tiny_hf_checkpoint(model, "llama")
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "llm_core.cli", "bench", "soak", "--model", str(model),
         "--server-arg=--backend=cpu", "--server-arg=--dtype=float32",
         "--server-arg=--kv-cache-memory=4MiB", "--duration", "6", "--interval", "2",
         "--concurrency", "3", "--input-len", "16", "--output-len", "8",
         "--warmup-intervals", "1", "--flat-mib", "4096", "--output-json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert len(report["samples"]) == 3
    assert all(s["rss_mib"] > 10 for s in report["samples"])  # the server's own memory
    verdict = report["verdict"]
    assert verdict["requests"] > 3 and verdict["errors"] == 0
    assert "resident memory after warm-up" in run.stdout
