"""EngineArgs: every setting of an engine, validated in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llm_hal import DType

from llm_core.engine.speculative import SpeculativeConfig

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30}  # fmt: skip


def parse_bytes(value: int | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"512MiB"`` or ``"1.5g"`` as a number of bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GiB, 512MiB or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(slots=True)
class EngineArgs:
    """Settings of an :class:`~llm_core.engine.llm_engine.LLMEngine` (vLLM's names where vLLM
    has the setting).

    ``model``: a Hugging Face checkpoint directory or a .gguf file; None for the built-in demo
    model (SmolLM2-135M-Instruct). ``backend``: a backend name, or None to pick the available
    one with the highest priority. ``dtype``: ``auto`` (the checkpoint's dtype; bf16 for GGUF),
    ``float32``, ``bfloat16``, ``float16``. ``kv_cache_memory``: bytes for the paged KV cache
    (``"2GiB"``); None: half of the device memory left free after the weights, at most 4 GiB
    (and never more than max_num_seqs x max_model_len tokens need). ``fallback_backend``:
    route operators the backend lacks to this one (off by default; every fallen-back op is
    logged and counted). ``block_size``: tokens per KV-cache block; None takes the backend's
    preferred size (16 on CPU). ``backend_options``: backend-specific settings (see each
    backend's docs), e.g. ``{"device": "pocl"}`` for OpenCL. ``speculative_config``:
    speculative decoding, vLLM's dict (or its JSON text), e.g. ``{"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4}`` or ``{"method": "draft_model",
    "model": PATH, "num_speculative_tokens": 4}``; see docs/speculative-decoding.md.
    """

    model: str | None = None
    tokenizer: str | None = None
    backend: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int | None = None
    kv_cache_memory: int | str | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    seed: int = 0
    trust_remote_code: bool = False
    fallback_backend: str | None = None
    backend_options: dict[str, str] = field(default_factory=dict)
    device_index: int = 0
    load_progress: bool = True
    speculative_config: SpeculativeConfig | dict[str, Any] | str | None = None

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            self.block_size < 1 or self.block_size & (self.block_size - 1)
        ):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype != "auto":
            DType.parse(self.dtype)
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        if self.trust_remote_code:
            raise ValueError(
                "trust_remote_code is not supported: llm-core runs only architectures it "
                "implements itself, and never executes code shipped with a checkpoint"
            )
