"""llm_core.benchmarks: ``llm-core bench`` (latency, throughput, serve), its baselines
(transformers, llama.cpp) and the machine ceilings every figure is quoted against.

See docs/performance.md for the method and the measured figures.
"""

from llm_core.benchmarks.ceilings import MachineCeilings
from llm_core.benchmarks.engine_driver import EngineDriver
from llm_core.benchmarks.errors import BaselineUnavailableError
from llm_core.benchmarks.http_driver import HttpDriver
from llm_core.benchmarks.prompts import BenchPrompts
from llm_core.benchmarks.report import BenchReport, LevelResult
from llm_core.benchmarks.results import RunResult, combine
from llm_core.benchmarks.runner import BenchConfig, BenchRunner
from llm_core.benchmarks.stats import LatencySummary
from llm_core.benchmarks.timeline import RequestTimeline

__all__ = [
    "BaselineUnavailableError",
    "BenchConfig",
    "BenchPrompts",
    "BenchReport",
    "BenchRunner",
    "EngineDriver",
    "HttpDriver",
    "LatencySummary",
    "LevelResult",
    "MachineCeilings",
    "RequestTimeline",
    "RunResult",
    "combine",
]
