"""llm_core: one LLM inference engine for heterogeneous hardware.

The public API is vLLM's offline API: ``from llm_core import LLM, SamplingParams``.
"""

from llm_core.config import EngineArgs
from llm_core.entrypoints.llm import LLM
from llm_core.outputs import CompletionOutput, Logprob, RequestOutput
from llm_core.sampling_params import GuidedDecodingParams, SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "GuidedDecodingParams",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
]
