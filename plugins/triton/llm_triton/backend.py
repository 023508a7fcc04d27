"""TritonBackend: the HAL operators on a torch GPU device, with the hot ones in Triton.

The base of the CUDA and ROCm backends (both drive ``torch.device("cuda")``; a ROCm build of
torch keeps that name). Dense linear layers go to cuBLAS/hipBLASLt through ``torch``;
normalization, rotary, gated activations, the KV-cache write, paged attention (prefill and
split-K decode) and the sampling draw are Triton kernels; the rest is the reference's torch
code, which runs on any torch device. fp64 goes to the reference: GPU kernels compute in fp32.

On a CPU device, with ``TRITON_INTERPRET=1``, the same class runs every kernel in Triton's
interpreter: that is how the tests check the kernels and the operator plumbing without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from llm_hal import (
    AttentionMetadata,
    DType,
    LinearWeight,
    QuantScheme,
    SamplingMetadata,
    TorchBackend,
)
from llm_hal.backend import CapturedGraph, Tensor

from llm_triton import kernels
from llm_triton.attention_inputs import AttentionInputs
from llm_triton.graphs import DecodeGraph, DecodeStep, StepGraph
from llm_triton.kernels import KernelConfig

_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

#: Largest head size the attention kernels take (their register tiles grow with it).
MAX_HEAD_SIZE = 256


def gpu_device(index: int, config: KernelConfig) -> tuple[torch.device, Any, KernelConfig]:
    """``torch.device("cuda", index)`` made the current device (Triton launches on the
    current device: one backend per process), its properties, and ``config`` sized to its
    multiprocessor count. ROCm builds of torch keep the ``cuda`` name."""
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    props = torch.cuda.get_device_properties(device)
    return device, props, config.with_device(props.multi_processor_count)


class TritonBackend(TorchBackend):
    name: ClassVar[str] = "triton"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset({DType.FP32, DType.FP16, DType.BF16})
    #: The fp8 format of this device's KV cache, or None when it has none.
    fp8_dtype: DType | None = None

    def __init__(self, device: str | torch.device, config: KernelConfig, graphs: bool = True):
        super().__init__(device)
        self.config = config
        self.graphs_enabled = graphs
        self._meta_key = f"{self.name}:{self.device}"
        self._graph_pool: Any = None
        self._recording: StepGraph | None = None  # set while capture_graph records

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            super().synchronize()

    # ------------------------------------------------------------------------------------------
    # metadata
    # ------------------------------------------------------------------------------------------

    def attention_inputs(self, meta: AttentionMetadata) -> AttentionInputs:
        """The step's metadata on the device: uploaded by the first layer, reused by the rest
        (and placed there in advance by a CUDA graph)."""
        inputs = meta.device_cache.get(self._meta_key)
        if self._recording is not None:  # capture_graph: static copies the replay refills
            inputs = self._recording.static_inputs(meta, inputs)
            meta.device_cache[self._meta_key] = inputs
        elif inputs is None:
            inputs = AttentionInputs.upload(meta, self.device)
            meta.device_cache[self._meta_key] = inputs
        return inputs

    def set_attention_inputs(self, meta: AttentionMetadata, inputs: AttentionInputs) -> None:
        meta.device_cache[self._meta_key] = inputs

    # ------------------------------------------------------------------------------------------
    # graphs
    # ------------------------------------------------------------------------------------------

    def _pool(self) -> Any:
        """The memory pool every graph of this backend records into (made on first use on
        CUDA; None elsewhere)."""
        if self.device.type == "cuda" and self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        """The HAL hook: ``fn`` (the engine's decode step for one padded batch size) recorded
        as a CUDA graph; see :class:`StepGraph`. None when graphs are off, or when ``fn`` does
        what a graph cannot hold (a host synchronization, an upload from host memory inside
        the step): the reason is logged and the step stays eager."""
        if not self.graphs_enabled:
            return super().capture_graph(fn)
        if self._recording is not None:
            raise RuntimeError("capture_graph calls cannot nest")
        pool = self._pool()
        return self._record_or_run(fn, lambda: StepGraph(self, fn, pool), "a CUDA graph")

    def capture_decode(
        self, step: DecodeStep, batch_size: int, max_blocks_per_seq: int, block_size: int
    ) -> DecodeGraph | None:
        """Record ``step`` (one decode step built from this backend's operators) as a CUDA
        graph for up to ``batch_size`` sequences of up to ``max_blocks_per_seq`` blocks; None
        when graphs are turned off. See :class:`DecodeGraph` for what the step may do.

        The backend side of the proposed optional HAL hook ``Backend.capture_decode``.
        Record the largest bucket first: the graphs share one memory pool.
        """
        if not self.graphs_enabled:
            return None
        return DecodeGraph(self, step, batch_size, max_blocks_per_seq, block_size, self._pool())

    # ------------------------------------------------------------------------------------------
    # capability
    # ------------------------------------------------------------------------------------------

    def supports(self, op: str, dtype: DType | None = None, **shape: int) -> bool:
        if not super().supports(op, dtype, **shape):
            return False
        if op.startswith("paged_attention") and shape.get("head_size", 0) > MAX_HEAD_SIZE:
            return False
        kv = shape.get("kv_dtype")
        if kv is not None and op in (
            "reshape_and_cache",
            "paged_attention_prefill",
            "paged_attention_decode",
        ):
            return self._kv_dtype_ok(kv if isinstance(kv, DType) else DType.parse(str(kv)))
        return True

    def _kv_dtype_ok(self, dtype: DType) -> bool:
        """Can the attention and cache kernels read and write a KV cache of ``dtype``?"""
        return dtype in self.float_dtypes or dtype is self.fp8_dtype

    # ------------------------------------------------------------------------------------------
    # operators
    # ------------------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        if weight.scheme is not QuantScheme.NONE or weight.weight.dtype != x.dtype:
            return super().linear(x, weight, out)
        if out is None:
            return F.linear(x, weight.weight, weight.bias)
        if weight.bias is None:
            return torch.matmul(x, weight.weight.T, out=out)
        return torch.addmm(weight.bias, x, weight.weight.T, out=out)

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if x.dtype not in _GPU_FLOATS or x.stride(-1) != 1 or not weight.is_contiguous():
            return super().rms_norm(x, weight, eps, residual, out)
        if residual is not None and residual.stride(-1) != 1:
            residual = residual.contiguous()
        return kernels.rms_norm(x, weight, eps, residual, out, self.config)

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        head_size: int,
        is_neox_style: bool,
    ) -> tuple[Tensor, Tensor]:
        if q.dtype not in _GPU_FLOATS or q.stride(-1) != 1 or k.stride(-1) != 1:
            return super().rotary_embedding(
                positions, q, k, cos_sin_cache, head_size, is_neox_style
            )
        return kernels.rotary_embedding(
            positions, q, k, cos_sin_cache.contiguous(), head_size, is_neox_style, self.config
        )

    def silu_and_mul(self, x: torch.Tensor, out: Tensor | None = None) -> Tensor:
        if x.dtype not in _GPU_FLOATS or x.stride(-1) != 1:
            return super().silu_and_mul(x, out)
        return kernels.silu_and_mul(x, out, self.config)

    def gelu_and_mul(
        self, x: torch.Tensor, approximate: str = "none", out: Tensor | None = None
    ) -> Tensor:
        if x.dtype not in _GPU_FLOATS or x.stride(-1) != 1:
            return super().gelu_and_mul(x, approximate, out)
        return kernels.gelu_and_mul(x, approximate, out, self.config)

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        if key.dtype not in _GPU_FLOATS or not key_cache.is_contiguous():
            return super().reshape_and_cache(key, value, key_cache, value_cache, meta)
        inputs = self.attention_inputs(meta)
        kernels.reshape_and_cache(
            key, value, key_cache, value_cache, inputs.slot_mapping, self.config
        )

    def _attention_ok(self, query: torch.Tensor, key_cache: torch.Tensor) -> bool:
        return (
            query.dtype in _GPU_FLOATS
            and query.stride(-1) == 1
            and key_cache.shape[3] <= MAX_HEAD_SIZE
            and key_cache.stride(3) == 1
            and key_cache.stride(2) == key_cache.shape[3]
        )

    def paged_attention_prefill(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        if not self._attention_ok(query, key_cache):
            return super().paged_attention_prefill(
                query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
            )
        a = self.attention_inputs(meta)
        return kernels.paged_attention_prefill(
            query,
            key_cache,
            value_cache,
            a.block_tables,
            a.query_start_loc,
            a.seq_lens,
            scale,
            a.max_query_len,
            sliding_window,
            logits_soft_cap,
            out,
            self.config,
        )

    def paged_attention_decode(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        meta.require_decode()
        if not self._attention_ok(query, key_cache):
            return super().paged_attention_decode(
                query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
            )
        a = self.attention_inputs(meta)
        return kernels.paged_attention_decode(
            query,
            key_cache,
            value_cache,
            a.block_tables,
            a.seq_lens,
            scale,
            a.max_seq_len,
            sliding_window,
            logits_soft_cap,
            out,
            self.config,
        )

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> Tensor:
        if logits.dtype == torch.float64:
            return super().sample(logits, meta)
        greedy_ids = logits.argmax(dim=-1)
        if meta.all_greedy:
            return greedy_ids
        probs = self.filtered_probs(logits, meta)  # (B, V) fp32, filtering stays in torch
        seeds = torch.from_numpy(meta.seeds).to(self.device)
        drawn = kernels.exponential_race(probs, seeds, self.config)
        greedy = torch.from_numpy(meta.temperature == 0).to(self.device)
        return torch.where(greedy, greedy_ids, drawn)

    # ------------------------------------------------------------------------------------------
    # memory
    # ------------------------------------------------------------------------------------------

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: DType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype.is_float and not self._kv_dtype_ok(dtype):
            raise ValueError(
                f"backend {self.name} cannot hold a KV cache in {dtype.value}; "
                f"use one of {sorted(d.value for d in self.float_dtypes)}"
                + (f" or {self.fp8_dtype.value}" if self.fp8_dtype else "")
            )
        return super().allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype)
