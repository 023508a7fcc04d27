"""BenchReport: what a benchmark run prints, writes as JSON and plots.

One report holds the machine's ceilings, the configuration, and per load level (batch size or
concurrency) the combined figures of llm-core and of each baseline, plus the ratios
llm-core / baseline measured in the same run. With speculative decoding it also prints the
acceptance figures beside the decode rate.
"""

from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

#: (figure, summary) pairs shown in the table and the plot, latencies in ms.
_LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))


@dataclass(slots=True)
class LevelResult:
    """Combined figures of one system at one load level."""

    system: str
    level: int | None  # batch size / concurrency; None = unlimited
    figures: dict[str, Any]
    iterations: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class BenchReport:
    command: str
    level_name: str  # "batch_size" or "concurrency"
    config: dict[str, Any]
    environment: dict[str, Any]
    ceilings: dict[str, Any] | None = None
    results: list[LevelResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------
    # derived
    # ------------------------------------------------------------------------------------------

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(r.system for r in self.results))

    def ratios(self, ours: str = "llm-core") -> list[dict[str, Any]]:
        """llm-core / baseline at each level: throughput ratios above 1 and latency ratios
        (baseline / llm-core) above 1 both mean llm-core is faster."""
        mine = {r.level: r.figures for r in self.results if r.system == ours}
        rows = []
        for r in self.results:
            if r.system == ours or r.level not in mine:
                continue
            a, b = mine[r.level], r.figures
            rows.append(
                {
                    self.level_name: r.level,
                    "baseline": r.system,
                    "decode_tok_s": _ratio(a.get("decode_tok_s", 0.0), b.get("decode_tok_s", 0.0)),
                    "output_throughput": _ratio(a["output_throughput"], b["output_throughput"]),
                    "ttft_median_speedup": _ratio(b["ttft_ms"]["median"], a["ttft_ms"]["median"]),
                    "tpot_median_speedup": _ratio(b["tpot_ms"]["median"], a["tpot_ms"]["median"]),
                    "e2e_median_speedup": _ratio(b["e2e_ms"]["median"], a["e2e_ms"]["median"]),
                }
            )
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "config": self.config,
            "environment": self.environment,
            "ceilings": self.ceilings,
            "results": [
                {
                    "system": r.system,
                    self.level_name: r.level,
                    "figures": r.figures,
                    "iterations": r.iterations,
                }
                for r in self.results
            ],
            "ratios": self.ratios(),
            "notes": self.notes,
        }

    # ------------------------------------------------------------------------------------------
    # output
    # ------------------------------------------------------------------------------------------

    def write_json(self, path: str | pathlib.Path) -> None:
        pathlib.Path(path).write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")

    def print(self, console: Console | None = None) -> None:
        if console is None:
            # A log or a pipe gets the whole table on one line per row.
            console = Console() if Console().is_terminal else Console(width=150)
        if self.ceilings:
            c = self.ceilings
            console.print(
                f"machine: read {c['read_gbs']:.1f} GB/s, copy {c['copy_gbs']:.1f} GB/s, GEMM "
                f"fp32 {c['gemm_fp32_gflops']:.0f} / bf16 {c['gemm_bf16_gflops']:.0f} GFLOP/s, "
                f"{c['threads']} threads"
            )
        table = Table(title=f"llm-core bench {self.command}")
        for col in ("system", self.level_name.replace("_", " "), "req/s", "out tok/s"):
            table.add_column(col, justify="right")
        for _, label in _LATENCIES:
            table.add_column(f"{label} ms med/p99", justify="right")
        table.add_column("peak RSS", justify="right")
        for r in self.results:
            f = r.figures
            table.add_row(
                r.system,
                "all" if r.level is None else str(r.level),
                f"{f['request_throughput']:.2f}",
                f"{f['output_throughput']:.1f}",
                *(f"{f[key]['median']:.1f}/{f[key]['p99']:.1f}" for key, _ in _LATENCIES),
                f"{f['peak_rss_bytes'] / 2**20:.0f} MiB",
            )
        console.print(table)
        for row in self.ratios():
            level = row[self.level_name]
            parts = [
                f"{name} x{row[key]:.2f}"
                for name, key in (
                    ("decode tok/s", "decode_tok_s"),
                    ("output throughput", "output_throughput"),
                    ("TTFT", "ttft_median_speedup"),
                    ("TPOT", "tpot_median_speedup"),
                )
                if math.isfinite(row[key])  # no TPOT when one token is generated
            ]
            console.print(
                f"llm-core vs {row['baseline']} at {self.level_name} "
                f"{'all' if level is None else level}: {', '.join(parts)} "
                "(above 1: llm-core faster)"
            )
        for r in self.results:
            roof = r.figures.get("decode_roofline_tok_s")
            if r.system == "llm-core" and roof:
                console.print(
                    f"llm-core decode at {self.level_name} {r.level}: "
                    f"{r.figures['decode_tok_s']:.1f} tok/s = "
                    f"{r.figures['decode_roofline_fraction']:.0%} of the {roof:.1f} tok/s roofline"
                )
        spec = self.environment.get("speculative_config")
        for r in self.results:
            f = r.figures
            if "spec_acceptance_rate" in f:
                per_pos = " ".join(f"{x:.2f}" for x in f["spec_acceptance_per_pos"].values())
                console.print(
                    f"{r.system} speculative decoding ({_describe_spec(spec)}) at "
                    f"{self.level_name} {'all' if r.level is None else r.level}: decode "
                    f"{f.get('decode_tok_s', float('nan')):.1f} tok/s, output "
                    f"{f['output_throughput']:.1f} tok/s; acceptance rate "
                    f"{f['spec_acceptance_rate']:.1%}, mean acceptance length "
                    f"{f['spec_mean_acceptance_length']:.2f}, per position {per_pos}",
                    soft_wrap=True,  # one line per level, for logs and grep
                )
        for r in self.results:
            if r.system == "llm-core" and "guided_mask_share" in r.figures:
                f = r.figures
                console.print(
                    f"llm-core guided decoding at {self.level_name} {r.level}: masks "
                    f"{f['guided_mask_ms_per_step']:.2f} ms per step = "
                    f"{f['guided_mask_share']:.1%} of the run; grammar compile "
                    f"{f['grammar_compile_ms']:.1f} ms"
                )
        for note in self.notes:
            console.print(f"note: {note}")

    def plot(self, path: str | pathlib.Path) -> None:
        """Latency percentiles and output throughput against the load level, per system."""
        try:
            import matplotlib
        except ImportError as exc:
            raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.5))
        for system in self.systems:
            rows = [r for r in self.results if r.system == system]
            x = [r.level or 0 for r in rows]
            for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
                for stat, style in (("median", "-o"), ("p90", "--^"), ("p99", ":v")):
                    ys = [r.figures[key][stat] for r in rows]
                    ax_lat.plot(x, ys, style, label=f"{system} {label} {stat}", markersize=4)
            ax_tput.plot(x, [r.figures["output_throughput"] for r in rows], "-o", label=system)
            roofs = [r.figures.get("decode_roofline_tok_s") for r in rows]
            if all(roofs):
                ax_tput.plot(x, roofs, "k:", label=f"{system} decode roofline")
        for ax, title, unit in ((ax_lat, "latency", "ms"), (ax_tput, "output throughput", "tok/s")):
            ax.set_xlabel(self.level_name.replace("_", " "))
            ax.set_ylabel(unit)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
        ax_lat.set_yscale("log")
        ax_lat.legend(fontsize=6, ncol=2)
        ax_tput.legend(fontsize=8)
        fig.suptitle(f"llm-core bench {self.command}")
        fig.tight_layout()
        fig.savefig(str(path), dpi=120)
        plt.close(fig)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _describe_spec(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "on"
    text = f"{spec['method']}, k={spec['num_speculative_tokens']}"
    if spec["method"] == "ngram":
        return f"{text}, lookup {spec['prompt_lookup_min']}-{spec['prompt_lookup_max']}"
    return f"{text}, draft {spec.get('model')}"
