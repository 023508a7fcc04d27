"""BenchRunner: one ``llm-core bench`` run, from the machine probes to the report.

For every load level (batch size for ``latency``, concurrency for ``throughput`` and
``serve``) it runs warm-up iterations, then ``num_iters`` measured ones, each on fresh prompts
(so no iteration hits the prefix cache of another), and takes the median of every figure.
Baselines run the very same prompts in the same process, right after llm-core at each level.
The ``no-spec`` baseline, a second engine of the same model without speculative decoding,
alternates with llm-core iteration by iteration instead, so that a drift of the machine's
speed between the two does not show up as a ratio.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pathlib
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llm_hal.spec import host_cpu_name

from llm_core.benchmarks.ceilings import MachineCeilings
from llm_core.benchmarks.engine_driver import EngineDriver
from llm_core.benchmarks.errors import BaselineUnavailableError
from llm_core.benchmarks.grounded import GroundedPrompts
from llm_core.benchmarks.prompts import BenchPrompts
from llm_core.benchmarks.report import BenchReport, LevelResult
from llm_core.benchmarks.results import RunResult, combine

log = logging.getLogger("llm_core.bench")

BASELINES = ("hf", "llama-cpp", "no-spec")
WORKLOADS = ("random", "grounded")
#: The system name of the ``no-spec`` baseline in reports.
NO_SPEC = "llm-core no-spec"


@dataclass(slots=True)
class BenchConfig:
    """What to run. ``levels``: batch sizes (latency) or concurrency caps (None: unlimited)."""

    command: str  # latency | throughput | serve
    input_len: int = 128
    output_len: int = 128
    levels: list[int | None] = field(default_factory=lambda: [None])
    num_prompts: int = 32  # per iteration (throughput, serve); latency uses the batch size
    request_rate: float | None = None  # requests/s (Poisson); None: all at once
    num_iters: int = 3
    num_iters_warmup: int = 1
    dataset: str | None = None
    workload: str = "random"  # random | grounded (chat requests to repeat or fix a paragraph)
    seed: int = 0
    baselines: list[str] = field(default_factory=list)
    llama_cpp_model: str | None = None
    roofline: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.command not in ("latency", "throughput", "serve"):
            raise ValueError(f"unknown bench command {self.command!r}")
        for name in ("input_len", "output_len", "num_prompts", "num_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.num_iters_warmup < 0:
            raise ValueError("--num-iters-warmup must be >= 0")
        if any(level is not None and level < 1 for level in self.levels):
            raise ValueError("batch sizes and concurrency levels must be >= 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError("--request-rate must be > 0")
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {WORKLOADS}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")

    @property
    def ignore_eos(self) -> bool:
        """Random prompts generate exactly ``output_len`` tokens; grounded ones stop at EOS."""
        return self.workload != "grounded"

    def requests_at(self, level: int | None) -> int:
        if self.command == "latency":
            return level or 1
        return self.num_prompts

    def max_in_flight(self) -> int:
        """The most requests any level has in flight at once."""
        return max(level or self.requests_at(level) for level in self.levels)


class BenchRunner:
    """Runs a :class:`BenchConfig` against ``driver`` (an EngineDriver or HttpDriver).

    ``engine``: the in-process LLMEngine when there is one (for the roofline, the baselines'
    model and dtype, and the environment); None for ``serve`` without a local model.
    """

    def __init__(self, config: BenchConfig, driver: Any, tokenizer: Any, engine: Any | None = None):
        self.config = config
        self.driver = driver
        self.engine = engine
        prompts = GroundedPrompts if config.workload == "grounded" else BenchPrompts
        self.prompts = prompts(tokenizer, config.input_len, config.seed, config.dataset)
        self.ceilings: MachineCeilings | None = None

    def run(self) -> BenchReport:
        cfg = self.config
        report = BenchReport(
            command=cfg.command,
            level_name="batch_size" if cfg.command == "latency" else "concurrency",
            config={**asdict(self.config), "prompts": self.prompts.describe()},
            environment=self.environment(),
        )
        drivers = {"llm-core": self.driver, **self._load_engine_baselines(report)}
        if cfg.roofline:
            self.ceilings = MachineCeilings.measure()
            report.ceilings = self.ceilings.as_dict()
        baselines = self._load_baselines(report)
        if baselines and not cfg.ignore_eos:
            report.notes.append(
                "the grounded workload stops at EOS, but transformers and llama.cpp always "
                "generate --output-len tokens: compare their TPOT, not their throughput"
            )
        for index, level in enumerate(cfg.levels):
            n = cfg.requests_at(level)
            concurrency = None if cfg.command == "latency" else level
            # Prompt rounds: distinct per level and iteration, warm-ups included.
            rounds = [1000 * index + i for i in range(cfg.num_iters)]
            warm = [1000 * index + 500 + i for i in range(cfg.num_iters_warmup)]
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in drivers}
            for i, r in enumerate(warm + rounds):
                prompts = self.prompts.make(n, round=r)
                measured = i >= len(warm)
                for name, driver in drivers.items():
                    label = f"{name} {report.level_name}={level or 'all'} " + (
                        f"iter {i - len(warm) + 1}/{cfg.num_iters}" if measured else "warm-up"
                    )
                    result = driver.run(
                        prompts, cfg.output_len, concurrency, cfg.request_rate, cfg.seed + r,
                        cfg.progress, label, ignore_eos=cfg.ignore_eos,
                    )  # fmt: skip
                    if measured:
                        runs[name].append(self._figures(result, level or n))
            for name, measured_runs in runs.items():
                report.results.append(
                    LevelResult(name, level, combine(measured_runs), measured_runs)
                )
            for name, baseline in baselines.items():
                report.results.append(self._run_baseline(name, baseline, level, n, rounds, warm))
        for baseline in baselines.values():
            close = getattr(baseline, "close", None)
            if close:
                close()
        return report

    # ------------------------------------------------------------------------------------------

    def _run_baseline(
        self,
        name: str,
        baseline: Any,
        level: int | None,
        n: int,
        rounds: list[int],
        warm: list[int],
    ) -> LevelResult:
        cfg = self.config
        wave = level or n
        if warm:  # one warm-up is enough: baselines capture nothing per batch size
            baseline.run(self.prompts.make(n, round=warm[0]), cfg.output_len, wave)
        runs = []
        for i, r in enumerate(rounds):
            label = f"{name} iter {i + 1}/{len(rounds)}"
            result = baseline.run(self.prompts.make(n, round=r), cfg.output_len, wave,
                                  cfg.progress, label)  # fmt: skip
            runs.append(self._figures(result, wave))
        return LevelResult(name, level, combine(runs), runs)

    def _figures(self, result: RunResult, batch: int) -> dict[str, Any]:
        figures = result.figures()
        tpot = figures["tpot_ms"]["median"] / 1e3
        if tpot > 0:
            figures["decode_tok_s"] = min(batch, figures["completed"]) / tpot
        roof = self._decode_roofline(min(batch, figures["completed"]))
        if roof and tpot > 0:
            figures["decode_roofline_tok_s"] = roof
            figures["decode_roofline_fraction"] = figures["decode_tok_s"] / roof
        return figures

    def _decode_roofline(self, batch: int) -> float | None:
        """Tokens/s a decode step of ``batch`` sequences cannot beat on this machine: it reads
        every weight once and each sequence's KV cache (at the mean context of the run), and
        does two flops per weight per sequence."""
        engine = self.engine
        if engine is None or self.ceilings is None or batch < 1:
            return None
        weights = float(engine.weight_bytes)
        report = engine.memory_report
        kv_per_token = report["kv_cache_bytes"] / max(1, report["kv_cache_tokens"])
        context = self.config.input_len + self.config.output_len / 2
        params = weights / engine.dtype.itemsize
        return self.ceilings.decode_roofline(
            weights + batch * context * kv_per_token, 2.0 * params * batch, batch
        )

    def _load_engine_baselines(self, report: BenchReport) -> dict[str, EngineDriver]:
        """``no-spec``: the same engine settings without speculative decoding, in a second
        engine (the model's weights and KV cache twice in memory)."""
        if "no-spec" not in self.config.baselines:
            return {}
        engine = self.engine
        if engine is None or engine.speculative_config is None:
            raise ValueError(
                "--baseline no-spec compares llm-core with --speculative-config against the "
                "same engine without it: give --speculative-config (bench latency or throughput)"
            )
        from llm_core.engine.llm_engine import LLMEngine

        plain = LLMEngine(replace(engine.args, speculative_config=None))
        report.environment[f"baseline_{NO_SPEC}"] = "the same engine, speculative decoding off"
        return {NO_SPEC: EngineDriver(plain, guided=getattr(self.driver, "guided", None))}

    def _load_baselines(self, report: BenchReport) -> dict[str, Any]:
        loaded: dict[str, Any] = {}
        for name in self.config.baselines:
            if name == "no-spec":
                continue
            try:
                loaded[{"hf": "transformers", "llama-cpp": "llama.cpp"}[name]] = self._load(name)
            except BaselineUnavailableError as exc:
                report.notes.append(f"baseline {name} skipped: {exc}")
                log.warning("baseline %s skipped: %s", name, exc)
        for name, baseline in loaded.items():
            report.environment[f"baseline_{name}"] = baseline.description
        return loaded

    def _load(self, name: str) -> Any:
        engine = self.engine
        if engine is None:
            raise BaselineUnavailableError("baselines need the model loaded locally (--model)")
        path = pathlib.Path(engine.checkpoint.path)
        if name == "hf":
            from llm_hal.dtypes import to_torch

            from llm_core.benchmarks.hf_baseline import HFBaseline

            return HFBaseline(path, to_torch(engine.dtype))
        from llm_core.benchmarks.gguf_export import export_gguf
        from llm_core.benchmarks.llamacpp_baseline import LlamaCppBaseline

        if self.config.llama_cpp_model:
            gguf = pathlib.Path(self.config.llama_cpp_model)
        elif path.suffix == ".gguf":
            gguf = export_gguf(path, "bf16" if engine.dtype.value == "bfloat16" else "f32")
        else:
            raise BaselineUnavailableError(
                f"{path} is not a GGUF file: convert it with llama.cpp's convert_hf_to_gguf.py "
                "and pass --llama-cpp-model FILE"
            )
        import torch

        max_seqs = self.config.max_in_flight()
        n_ctx = self.config.input_len + self.config.output_len + 8
        return LlamaCppBaseline(gguf, torch.get_num_threads(), max_seqs, n_ctx)

    def environment(self) -> dict[str, Any]:
        import torch

        env: dict[str, Any] = {
            "llm_core": _version("llm-core"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": host_cpu_name(),
            "threads": torch.get_num_threads(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_sha": _git_sha(),
        }
        engine = self.engine
        if engine is not None:
            info = engine.backend.device_info()
            env.update(
                backend=engine.backend.name,
                device=info.name,
                device_properties=dict(info.properties),
                dtype=engine.dtype.value,
                model=str(engine.checkpoint.path),
                speculative_config=(
                    asdict(engine.speculative_config) if engine.speculative_config else None
                ),
                weights_bytes=int(engine.weight_bytes),
            )
        return env


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=os.path.dirname(__file__),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
