"""The OpenCL backend: pyopencl arrays on one device, every model operator an OpenCL C kernel.

Tensors are ``pyopencl.array.Array`` objects, row-major and contiguous. fp32, fp16 and bf16
are storage types; all arithmetic is fp32 (see ``kernels/common.h``). bf16 has no numpy type:
it is held as ``uint16`` (the upper half of the fp32 bit pattern), so a ``uint16`` array *is* a
bf16 tensor here. ``split`` copies each part into its own contiguous array (OpenCL buffers have
no cheap strided views), so rotary embedding and the KV-cache write see contiguous q, k, v.

Nothing inside a forward pass goes through the host: the per-step metadata (block tables,
slots, sampling settings) is uploaded once per step and cached in its ``device_cache``, with a
copy of the host arrays it came from so that an object updated in place is uploaded again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pyopencl.tools as cl_tools
import torch
from llm_hal import (
    AttentionMetadata,
    Backend,
    DeviceInfo,
    DType,
    LinearWeight,
    LogprobsResult,
    MemoryInfo,
    PenaltyMetadata,
    QuantScheme,
    SamplingMetadata,
    UnsupportedOpError,
)
from llm_hal.backend import CapturedGraph, Tensor
from llm_hal.dtypes import from_torch, to_torch
from llm_hal.reference import check_soft_cap, dtype_rounded

from llm_core_opencl.device import Candidate, select_device, selector_from_env
from llm_core_opencl.programs import ProgramCache

Array = cla.Array
log = logging.getLogger("llm_core.opencl")

_NUMPY: dict[DType, type[np.generic]] = {
    DType.FP32: np.float32,
    DType.FP16: np.float16,
    DType.BF16: np.uint16,
    DType.FP64: np.float64,
    DType.INT64: np.int64,
    DType.INT32: np.int32,
    DType.INT8: np.int8,
    DType.UINT8: np.uint8,
    DType.BOOL: np.bool_,
}
_FROM_NUMPY = {np.dtype(v): k for k, v in _NUMPY.items()}

#: ``-DSTORAGE=`` code of each float storage type (kernels/common.h).
_STORAGE = {DType.FP32: 0, DType.FP16: 1, DType.BF16: 2}

_SAMPLING_OPS = (
    "apply_penalties",
    "apply_token_bans",
    "apply_token_bitmask",
    "sample",
    "compute_logprobs",
)
_ATTENTION_OPS = ("paged_attention_prefill", "paged_attention_decode")
#: The largest head size the attention kernel holds in local memory.
MAX_HEAD_SIZE = 512
#: Up to this many rows a linear layer takes the GEMV kernel (the decode shape).
GEMV_MAX_ROWS = 4
#: Tile shapes of the GEMM kernel: a TM x TN tile per work-group, WM x WN per work-item.
GEMM_TILE = {"TM": 64, "TN": 64, "WM": 4, "WN": 4, "TK": 16}


def _i32(v: int) -> np.int32:
    return np.int32(v)


def _f32(v: float) -> np.float32:
    return np.float32(v)


def _pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


class OpenCLBackend(Backend):
    """One OpenCL device: its context, queue, memory pool and programs."""

    name: ClassVar[str] = "opencl"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset({DType.FP32, DType.FP16, DType.BF16})

    def __init__(self, selector: str | None = None, index: int = 0, flavour: str | None = None):
        """Run on the device ``selector`` and ``index`` pick (see :mod:`llm_core_opencl.device`;
        no selector: the ``LLM_CORE_OPENCL_DEVICE`` environment variable, else automatic).
        ``flavour`` picks the kernel family, ``"cpu"`` or ``"gpu"``; by default the device
        type decides (see ``kernels/linear.cl``)."""
        self.candidate: Candidate = select_device(selector_from_env(selector), index)
        self.device = self.candidate.device
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        # A pool makes per-step temporaries cheap, but it rounds sizes up: on a simulator, whose
        # point is to catch out-of-bounds accesses, every buffer has its exact size.
        immediate = cl_tools.ImmediateAllocator(self.queue)
        self.pool = None if self.candidate.is_simulator else cl_tools.MemoryPool(immediate)
        self.allocator: Any = self.pool or immediate
        self.programs = ProgramCache(self.context, self.device)
        self._graph: OpenCLGraph | None = None  # set while capture_graph records
        self.native_fp16 = "cl_khr_fp16" in self.device.extensions
        self.flavour = flavour or ("cpu" if self.candidate.kind == "CPU" else "gpu")
        if self.flavour not in ("cpu", "gpu"):
            raise ValueError(f"flavour must be 'cpu' or 'gpu', not {flavour!r}")
        limit = int(self.device.max_work_group_size)
        self.row_wg = _pow2_at_most(min(256, limit))  # norms, sampling: one group per row
        self.attn_wg = _pow2_at_most(min(64, limit))
        self.gemv_wg = _pow2_at_most(min(64, limit))

    # ------------------------------------------------------------------------------------------
    # device and memory
    # ------------------------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        d = self.device
        return DeviceInfo(
            index=self.candidate.device_index,
            name=f"{self.candidate.platform_name} / {d.name}",
            total_memory=int(d.global_mem_size),
            properties={
                "selector": f"{self.candidate.platform_index}:{self.candidate.device_index}",
                "type": self.candidate.kind,
                "version": d.version,
                "driver": d.driver_version,
                "compute_units": str(d.max_compute_units),
                "fp16_arithmetic": "yes" if self.native_fp16 else "no (storage only)",
            },
        )

    def memory_info(self) -> MemoryInfo:
        # OpenCL has no free-memory query: report what this backend's pool has not handed out.
        total = int(self.device.global_mem_size)
        free = max(0, total - (int(self.pool.active_bytes) if self.pool else 0))
        if int(self.device.type) & int(cl.device_type.CPU):
            from llm_hal.reference import host_memory_info

            free = min(free, host_memory_info().free)
        return MemoryInfo(total=total, free=free)

    def synchronize(self) -> None:
        self.queue.finish()

    def empty(self, shape: Sequence[int], dtype: DType) -> Array:
        return cla.empty(
            self.queue, tuple(int(s) for s in shape), self._np(dtype), allocator=self.allocator
        )

    def _zeros(self, shape: Sequence[int], dtype: DType) -> Array:
        self._refuse_capture("a zero-filled tensor (PyOpenCL's fill kernel)")
        return cla.zeros(
            self.queue, tuple(int(s) for s in shape), self._np(dtype), allocator=self.allocator
        )

    def from_host(self, data: Any, dtype: DType | None = None) -> Array:
        self._refuse_capture("from_host inside the step")
        if isinstance(data, torch.Tensor):
            t = data.detach().to("cpu").contiguous()
            target = dtype or from_torch(t.dtype)
        else:
            arr = np.ascontiguousarray(data)
            target = dtype or self._from_np(arr.dtype)
            t = (
                torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
                if arr.dtype == np.uint16
                else torch.from_numpy(arr)
            )
        if target not in _NUMPY:
            raise UnsupportedOpError(self.name, "from_host", f"dtype {target.value}")
        # Conversion happens here on the host: this is load-time or per-step input, not compute.
        t = t.to(to_torch(target)).contiguous()
        host = t.view(torch.int16).numpy().view(np.uint16) if target is DType.BF16 else t.numpy()
        return cla.to_device(self.queue, host, allocator=self.allocator)

    def to_host(self, tensor: Array | torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.Tensor):  # already on the host (callers may not check)
            return tensor.detach().to("cpu", copy=True).contiguous()
        self._refuse_capture("to_host inside the step")
        host = np.ascontiguousarray(tensor.get(self.queue))
        if host.dtype == np.uint16:
            return torch.from_numpy(host.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(host.copy())

    def copy_(self, dst: Array, src: Array) -> Array:
        if dst.size != src.size:
            raise ValueError(f"copy_ between shapes {dst.shape} and {src.shape}")
        if dst.size == 0:
            return dst
        if not (dst.flags.forc and src.flags.forc):
            raise ValueError("copy_ needs contiguous tensors")
        if dst.dtype == src.dtype:
            dst_buf: Any = dst.base_data  # pyopencl's stubs allow None for empty arrays
            src_buf: Any = src.base_data
            copy = partial(
                cl.enqueue_copy,
                self.queue,
                dst_buf,
                src_buf,
                byte_count=src.nbytes,
                src_offset=src.offset,
                dst_offset=dst.offset,
            )
            copy()
            if self._graph is not None:
                self._graph.steps.append(copy)
            return dst
        sd, dd = self.dtype_of(src), self.dtype_of(dst)
        if sd in _STORAGE and dd in _STORAGE:
            src_c = self._contig(src)
            target, pending = self._target(dst, dst.shape, dd)
            kernel = self.programs.kernel(
                "convert.cl", "convert", SRC=_STORAGE[sd], DST=_STORAGE[dd]
            )
            self._run(kernel, (src.size,), None, src_c.data, target.data)
            return self._deliver(target, pending)
        if {sd, dd}.isdisjoint({DType.FP16, DType.BF16}):  # pyopencl's own kernels know these
            return self.copy_(dst, self._astype(self._contig(src), dst.dtype))
        # fp64 <-> half or bf16: not on any forward path, so through the host
        self._refuse_capture("a copy_ between fp64 and a 16-bit type goes through the host")
        return self.copy_(dst, self.from_host(self.to_host(src), dd))

    def dtype_of(self, tensor: Array) -> DType:
        return self._from_np(tensor.dtype)

    def reshape(self, tensor: Array, shape: Sequence[int]) -> Array:
        return self._contig(tensor).reshape(tuple(int(s) for s in shape))

    def split(self, tensor: Array, sizes: Sequence[int]) -> list[Array]:
        """Copies (see the module docstring): each part is a new contiguous array."""
        width = int(tensor.shape[-1])
        if sum(sizes) != width:
            raise ValueError(f"split sizes {list(sizes)} do not sum to {width}")
        dtype = self._float(tensor, "split")
        src = self._contig(tensor)
        rows = src.size // width if width else 0
        kernel = self._kernel("elementwise.cl", "copy_columns", dtype)
        parts, col = [], 0
        for size in sizes:
            part = self.empty((*tensor.shape[:-1], size), dtype)
            self._run(
                kernel, (size, rows), None, src.data, _i32(width), _i32(col), part.data, _i32(size)
            )
            parts.append(part)
            col += size
        return parts

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: DType
    ) -> tuple[Array, Array]:
        shape = (num_blocks, block_size, num_kv_heads, head_size)
        return self._zeros(shape, dtype), self._zeros(shape, dtype)

    def prepare_linear(
        self,
        weight: Array,
        bias: Array | None = None,
        scheme: QuantScheme = QuantScheme.NONE,
        scales: Array | None = None,
        zeros: Array | None = None,
        group_size: int = 0,
    ) -> LinearWeight:
        prepared = super().prepare_linear(weight, bias, scheme, scales, zeros, group_size)
        if prepared.bias is not None:
            prepared.bias = self._contig(prepared.bias)
        prepared.weight = self._contig(prepared.weight)
        return prepared

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        """Record every kernel launch, device copy and metadata upload ``fn`` makes; a replay
        re-issues them with no Python operator code, re-uploading the metadata objects'
        current values into the same device buffers. Temporaries stay allocated with the
        graph. Refused (None, reason logged) when ``fn`` did something that cannot be
        replayed: a conversion by PyOpenCL's own kernels, a copy through the host."""
        if self._graph is not None:
            raise RuntimeError("capture_graph calls cannot nest")
        graph = OpenCLGraph()
        self._graph = graph
        try:
            fn()
        finally:
            self._graph = None
        if graph.refused:
            log.info("opencl: not capturing this step: %s", graph.refused)
            return None
        return graph

    # ------------------------------------------------------------------------------------------
    # capability
    # ------------------------------------------------------------------------------------------

    def supports(self, op: str, dtype: DType | None = None, **shape: Any) -> bool:
        if not super().supports(op, dtype):
            return False
        if op in _SAMPLING_OPS:
            return dtype in (None, DType.FP32)
        scheme = shape.get("scheme", QuantScheme.NONE)
        if op == "linear" and QuantScheme(scheme) is not QuantScheme.NONE:
            return False
        head_size = int(shape.get("head_size", 0))
        return not (op in _ATTENTION_OPS and head_size > MAX_HEAD_SIZE)

    # ------------------------------------------------------------------------------------------
    # embedding and linear layers
    # ------------------------------------------------------------------------------------------

    def embedding(self, ids: Array, table: Array, out: Tensor | None = None) -> Tensor:
        dtype = self._float(table, "embedding")
        t, hidden = int(ids.shape[0]), int(table.shape[1])
        target, pending = self._target(out, (t, hidden), dtype)
        name = "embedding_i32" if ids.dtype == np.int32 else "embedding_i64"
        ids = self._contig(ids if ids.dtype == np.int32 else self._astype(ids, np.int64))
        kernel = self._kernel("elementwise.cl", name, dtype)
        self._run(
            kernel, (hidden, t), None, self._contig(table).data, ids.data, target.data, _i32(hidden)
        )
        return self._deliver(target, pending)

    def linear(self, x: Array, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        if weight.scheme is not QuantScheme.NONE:
            raise UnsupportedOpError(self.name, "linear", f"quantization {weight.scheme.value}")
        dtype = self._float(x, "linear")
        w = self._as(weight.weight, dtype)
        bias = None if weight.bias is None else self._as(weight.bias, dtype)
        x = self._contig(x)
        m, k = int(x.shape[0]), int(x.shape[1])
        n = weight.out_features
        target, pending = self._target(out, (m, n), dtype)
        args = (x.data, w.data, None if bias is None else bias.data, _i32(bias is not None),
                target.data, _i32(m), _i32(n), _i32(k))  # fmt: skip
        defines = {**GEMM_TILE, "GWG": self.gemv_wg, "GEMV_MAX_M": GEMV_MAX_ROWS, "RN": 8}
        if self.flavour == "cpu":
            rm = 1 if m == 1 else 4  # a lone row (decode) must not pay for four
            kernel = self._kernel("linear.cl", "blocked_gemm", dtype, mad=True, **defines, RM=rm)
            self._run(kernel, (-(-n // 8), -(-m // rm)), None, *args)
        elif m <= GEMV_MAX_ROWS:
            kernel = self._kernel("linear.cl", "gemv", dtype, mad=True, **defines, RM=4)
            self._run(kernel, (self.gemv_wg * n,), (self.gemv_wg,), *args)
        else:
            tile = GEMM_TILE
            rx, ry = tile["TN"] // tile["WN"], tile["TM"] // tile["WM"]
            groups = (-(-n // tile["TN"]), -(-m // tile["TM"]))
            kernel = self._kernel("linear.cl", "gemm", dtype, mad=True, **defines, RM=4)
            self._run(kernel, (groups[0] * rx, groups[1] * ry), (rx, ry), *args)
        return self._deliver(target, pending)

    # ------------------------------------------------------------------------------------------
    # normalization
    # ------------------------------------------------------------------------------------------

    def rms_norm(
        self,
        x: Array,
        weight: Array,
        eps: float,
        residual: Array | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        dtype = self._float(x, "rms_norm")
        return self._row_norm("rms_norm", x, self._as(weight, dtype), eps, residual, out)

    def gemma_rms_norm(
        self,
        x: Array,
        weight: Array,
        eps: float,
        residual: Array | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        self._float(x, "gemma_rms_norm")
        # (1 + w) is formed from the weight in its own dtype (fp64 is read as fp32).
        w_dtype = self.dtype_of(weight)
        weight = self._as(weight, w_dtype if w_dtype in _STORAGE else DType.FP32)
        return self._row_norm("gemma_rms_norm", x, weight, eps, residual, out)

    def _row_norm(
        self,
        name: str,
        x: Array,
        weight: Array,
        eps: float,
        residual: Array | None,
        out: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``rms_norm`` or ``gemma_rms_norm`` (kernel ``name`` of norm.cl) of the rows of x."""
        dtype = self._float(x, name)
        x = self._contig(x)
        hidden = int(x.shape[-1])
        rows = x.size // hidden if hidden else 0
        target, pending = self._target(out, x.shape, dtype)
        # The sum s is written over residual (allowed by the contract) when it is plain and of
        # x's dtype; else over a plain copy of it in x's dtype.
        s = None if residual is None else self._as(residual, dtype)
        # The weight's storage type: x's (one program for every norm) unless gemma_rms_norm
        # is given a weight of another float type.
        wstorage = _STORAGE[self.dtype_of(weight)]
        kernel = self._kernel("norm.cl", name, dtype, WG=self.row_wg, WSTORAGE=wstorage)
        self._run(
            kernel, (self.row_wg * rows,), (self.row_wg,), x.data,
            None if s is None else s.data, _i32(s is not None), weight.data,
            target.data, _i32(hidden), _f32(eps),
        )  # fmt: skip
        return self._deliver(target, pending), s

    def layer_norm(
        self, x: Array, weight: Array, bias: Array | None, eps: float, out: Tensor | None = None
    ) -> Tensor:
        dtype = self._float(x, "layer_norm")
        x = self._contig(x)
        hidden = int(x.shape[-1])
        rows = x.size // hidden if hidden else 0
        target, pending = self._target(out, x.shape, dtype)
        b = None if bias is None else self._as(bias, dtype)
        kernel = self._kernel(
            "norm.cl", "layer_norm", dtype, WG=self.row_wg, WSTORAGE=_STORAGE[dtype]
        )
        self._run(
            kernel, (self.row_wg * rows,), (self.row_wg,), x.data, self._as(weight, dtype).data,
            None if b is None else b.data, _i32(b is not None), target.data, _i32(hidden),
            _f32(eps),
        )  # fmt: skip
        return self._deliver(target, pending)

    # ------------------------------------------------------------------------------------------
    # attention
    # ------------------------------------------------------------------------------------------

    def rotary_embedding(
        self,
        positions: Array,
        q: Array,
        k: Array,
        cos_sin_cache: Array,
        head_size: int,
        is_neox_style: bool,
    ) -> tuple[Tensor, Tensor]:
        pos = self._contig(self._astype(positions, np.int64))
        cache = self._as(cos_sin_cache, DType.FP32)
        rot = int(cache.shape[-1])
        tokens = int(pos.shape[0])
        for x in (q, k):
            dtype = self._float(x, "rotary_embedding")
            work = self._contig(x)
            heads = int(work.shape[-1]) // head_size
            kernel = self._kernel("rotary_cache.cl", "rotary", dtype)
            self._run(
                kernel, (rot // 2, heads, tokens), None, pos.data, work.data, cache.data,
                _i32(heads), _i32(head_size), _i32(rot), _i32(is_neox_style),
            )  # fmt: skip
            if work is not x:
                self.copy_(x, work)
        return q, k

    def reshape_and_cache(
        self,
        key: Array,
        value: Array,
        key_cache: Array,
        value_cache: Array,
        meta: AttentionMetadata,
    ) -> None:
        dtype = self._float(key_cache, "reshape_and_cache")
        (slots,) = self._uploaded(meta, "opencl.slots", (meta.slot_mapping,))
        width = int(key_cache.shape[2]) * int(key_cache.shape[3])
        tokens = int(slots.shape[0])
        kernel = self._kernel("rotary_cache.cl", "reshape_and_cache", dtype)
        self._run(
            kernel, (width, tokens), None, self._as(key, dtype).data,
            self._as(value, dtype).data, key_cache.data, value_cache.data, slots.data,
            _i32(width),
        )  # fmt: skip

    @staticmethod
    def _attention_meta(meta: AttentionMetadata) -> tuple[np.ndarray, ...]:
        """(token_seq, token_pos, block_tables): what the attention kernel indexes with."""
        qlens = meta.query_lens
        token_seq = np.repeat(np.arange(meta.num_seqs, dtype=np.int32), qlens)
        starts = np.repeat(meta.query_start_loc[:-1], qlens)
        first = np.repeat(meta.seq_lens - qlens, qlens)
        token_pos = (first + np.arange(meta.num_tokens) - starts).astype(np.int32)
        tables = meta.block_tables
        if not tables.shape[1]:
            tables = np.zeros((meta.num_seqs, 1), np.int32)
        return (token_seq, token_pos, tables)

    def paged_attention_prefill(
        self,
        query: Array,
        key_cache: Array,
        value_cache: Array,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        dtype = self._float(query, "paged_attention_prefill")
        _, block_size, hkv, head_size = (int(s) for s in key_cache.shape)
        if head_size > MAX_HEAD_SIZE:
            raise UnsupportedOpError(self.name, "paged_attention", f"head size {head_size}")
        query = self._contig(query)
        tokens = int(query.shape[0])
        hq = int(query.shape[1]) // head_size
        target, pending = self._target(out, query.shape, dtype)
        if tokens == 0:
            return self._deliver(target, pending)
        token_seq, token_pos, tables = self._uploaded(
            meta,
            "opencl.attn",
            (meta.query_start_loc, meta.seq_lens, meta.block_tables),
            lambda: self._attention_meta(meta),
        )
        wg = self.attn_wg
        max_head = max(64, 1 << (head_size - 1).bit_length())
        kernel = self._kernel(
            "paged_attention.cl", "paged_attention", dtype, WG=wg, MAX_HEAD=max_head
        )
        self._run(
            kernel, (wg * hq, tokens), (wg, 1), query.data, self._as(key_cache, dtype).data,
            self._as(value_cache, dtype).data, token_seq.data, token_pos.data, tables.data,
            _i32(tables.shape[1]), _i32(block_size), _i32(hq), _i32(hkv), _i32(head_size),
            _f32(scale), _i32(sliding_window or 0), _f32(logits_soft_cap or 0.0), target.data,
        )  # fmt: skip
        return self._deliver(target, pending)

    def paged_attention_decode(
        self,
        query: Array,
        key_cache: Array,
        value_cache: Array,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        meta.require_decode()
        return self.paged_attention_prefill(
            query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
        )

    # ------------------------------------------------------------------------------------------
    # activations and elementwise
    # ------------------------------------------------------------------------------------------

    def _gated(self, name: str, x: Array, out: Tensor | None, *extra: Any) -> Tensor:
        dtype = self._float(x, name)
        x = self._contig(x)
        inter = int(x.shape[-1]) // 2
        rows = x.size // (2 * inter) if inter else 0
        target, pending = self._target(out, (*x.shape[:-1], inter), dtype)
        kernel = self._kernel("elementwise.cl", name, dtype)
        self._run(kernel, (inter, rows), None, x.data, target.data, _i32(inter), *extra)
        return self._deliver(target, pending)

    def silu_and_mul(self, x: Array, out: Tensor | None = None) -> Tensor:
        return self._gated("silu_and_mul", x, out)

    def gelu_and_mul(
        self, x: Array, approximate: str = "none", out: Tensor | None = None
    ) -> Tensor:
        return self._gated("gelu_and_mul", x, out, _i32(_tanh_approximation(approximate)))

    def gelu(self, x: Array, approximate: str = "none", out: Tensor | None = None) -> Tensor:
        dtype = self._float(x, "gelu")
        return self._map("gelu", x, dtype, out, _i32(_tanh_approximation(approximate)))

    def add(self, a: Array, b: Array, out: Tensor | None = None) -> Tensor:
        dtype = self._float(a, "add")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"add of shapes {a.shape} and {b.shape}")
        a = self._contig(a)
        target, pending = self._target(out, a.shape, dtype)
        kernel = self._kernel("elementwise.cl", "add", dtype)
        self._run(kernel, (a.size,), None, a.data, self._as(b, dtype).data, target.data)
        return self._deliver(target, pending)

    def scale(self, x: Array, factor: float, out: Tensor | None = None) -> Tensor:
        dtype = self._float(x, "scale")
        # The factor rounded to x's dtype (the contract); the kernel rounds the product once.
        return self._map("scale", x, dtype, out, _f32(dtype_rounded(factor, to_torch(dtype))))

    def soft_cap(self, x: Array, cap: float, out: Tensor | None = None) -> Tensor:
        check_soft_cap(cap)
        return self._map("soft_cap", x, self._float(x, "soft_cap"), out, _f32(cap))

    def _map(self, name: str, x: Array, dtype: DType, out: Tensor | None, *extra: Any) -> Tensor:
        """An elementwise kernel ``name(x, out, *extra)`` of elementwise.cl."""
        x = self._contig(x)
        target, pending = self._target(out, x.shape, dtype)
        kernel = self._kernel("elementwise.cl", name, dtype)
        self._run(kernel, (x.size,), None, x.data, target.data, *extra)
        return self._deliver(target, pending)

    def gather_rows(self, x: Array, indices: Array, out: Tensor | None = None) -> Tensor:
        dtype = self._float(x, "gather_rows")
        hidden, rows = int(x.shape[1]), int(indices.shape[0])
        idx = self._contig(self._astype(indices, np.int64))
        target, pending = self._target(out, (rows, hidden), dtype)
        kernel = self._kernel("elementwise.cl", "gather_rows", dtype)
        self._run(
            kernel, (hidden, rows), None, self._contig(x).data, idx.data, target.data, _i32(hidden)
        )
        return self._deliver(target, pending)

    # ------------------------------------------------------------------------------------------
    # logits processing and sampling
    # ------------------------------------------------------------------------------------------

    def _sampling_kernel(self, name: str, vocab: int = 0) -> tuple[Any, int]:
        """A kernel of sampling.cl and its work-group size: small vocabularies get small
        groups (a row kernel makes dozens of passes, each ending in a group reduction). Two
        sizes only: each one is another compilation of the program."""
        wg = min(32, self.row_wg) if 0 < vocab <= 4096 else self.row_wg
        return self.programs.kernel("sampling.cl", name, STORAGE=0, WG=wg), wg

    def apply_penalties(self, logits: Array, meta: PenaltyMetadata) -> Tensor:
        self._logits(logits, "apply_penalties")
        rows, vocab = (int(s) for s in logits.shape)
        uploaded = self._uploaded(
            meta,
            "opencl.penalties",
            (meta.prompt_ids, meta.output_ids, meta.presence, meta.frequency, meta.repetition),
        )
        prompt, output, presence, frequency, repetition = uploaded
        counts = self._zeros((rows, vocab), DType.INT32)
        count, _ = self._sampling_kernel("count_tokens")
        for ids, is_prompt in ((prompt, 1), (output, 0)):
            width = int(ids.shape[1])
            self._run(
                count,
                (width, rows),
                None,
                ids.data,
                _i32(width),
                counts.data,
                _i32(vocab),
                _i32(is_prompt),
            )
        self._run(
            self._sampling_kernel("apply_penalties")[0], (vocab, rows), None, logits.data,
            counts.data, _i32(vocab), presence.data, frequency.data, repetition.data,
        )  # fmt: skip
        return logits

    def apply_token_bans(self, logits: Array, banned: Array) -> Tensor:
        self._logits(logits, "apply_token_bans")
        vocab = int(logits.shape[1])
        rows, width = (int(s) for s in banned.shape)
        ids = self._contig(self._astype(banned, np.int64))
        kernel, _ = self._sampling_kernel("apply_token_bans")
        self._run(kernel, (width, rows), None, logits.data, _i32(vocab), ids.data, _i32(width))
        return logits

    def apply_token_bitmask(self, logits: Array, bitmask: Array) -> Tensor:
        self._logits(logits, "apply_token_bitmask")
        rows, vocab = (int(s) for s in logits.shape)
        shape = tuple(int(s) for s in bitmask.shape)
        if len(shape) != 2 or shape[0] != rows or shape[1] * 32 < vocab:
            raise ValueError(
                f"apply_token_bitmask: a bitmask (B, ceil(V / 32)) = ({rows}, {-(-vocab // 32)}) "
                f"for logits {tuple(logits.shape)}, not {shape}"
            )
        words = shape[1]
        mask = self._contig(self._astype(bitmask, np.int32))
        kernel, _ = self._sampling_kernel("apply_token_bitmask")
        self._run(kernel, (vocab, rows), None, logits.data, _i32(vocab), mask.data, _i32(words))
        return logits

    def sample(self, logits: Array, meta: SamplingMetadata) -> Tensor:
        self._logits(logits, "sample")
        rows, vocab = (int(s) for s in logits.shape)
        uploaded = self._uploaded(
            meta,
            "opencl.sampling",
            (meta.temperature, meta.top_k, meta.top_p, meta.min_p, meta.seeds),
        )
        temperature, top_k, top_p, min_p, seeds = uploaded
        tokens = self.empty((rows,), DType.INT64)
        probs = self.empty((rows, vocab), DType.FP32)
        kernel, wg = self._sampling_kernel("sample", vocab)
        self._run(
            kernel, (wg * rows,), (wg,), logits.data,
            _i32(vocab), temperature.data, top_k.data, top_p.data, min_p.data, seeds.data,
            probs.data, tokens.data,
        )  # fmt: skip
        return tokens

    def compute_logprobs(self, logits: Array, token_ids: Array, num_top: int) -> LogprobsResult:
        self._logits(logits, "compute_logprobs")
        rows, vocab = (int(s) for s in logits.shape)
        ids = self._contig(self._astype(token_ids, np.int64))
        result = LogprobsResult(
            token_logprobs=self.empty((rows,), DType.FP32),
            token_ranks=self.empty((rows,), DType.INT64),
            top_logprobs=self.empty((rows, num_top), DType.FP32),
            top_ids=self.empty((rows, num_top), DType.INT64),
        )
        kernel, wg = self._sampling_kernel("logprobs", vocab)
        self._run(
            kernel, (wg * rows,), (wg,),
            logits.data, _i32(vocab), ids.data, result.token_logprobs.data,
            result.token_ranks.data, _i32(num_top), result.top_logprobs.data,
            result.top_ids.data,
        )  # fmt: skip
        return result

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    def _np(self, dtype: DType) -> type[np.generic]:
        try:
            return _NUMPY[dtype]
        except KeyError:
            raise UnsupportedOpError(self.name, "empty", f"dtype {dtype.value}") from None

    @staticmethod
    def _from_np(dtype: np.dtype) -> DType:
        try:
            return _FROM_NUMPY[np.dtype(dtype)]
        except KeyError:
            raise ValueError(f"numpy dtype {dtype} has no HAL equivalent") from None

    def _kernel(
        self, source: str, name: str, dtype: DType, *, mad: bool = False, **defines: int
    ) -> Any:
        return self.programs.kernel(source, name, mad=mad, STORAGE=_STORAGE[dtype], **defines)

    def _run(
        self,
        kernel: Any,
        global_size: tuple[int, ...],
        local_size: tuple[int, ...] | None,
        *args: Any,
    ) -> None:
        if math.prod(global_size) == 0:
            return
        launch = partial(self._launch, kernel, global_size, local_size, args)
        launch()
        if self._graph is not None:
            self._graph.steps.append(launch)

    def _launch(
        self,
        kernel: Any,
        global_size: tuple[int, ...],
        local_size: tuple[int, ...] | None,
        args: tuple[Any, ...],
    ) -> None:
        kernel.set_args(*args)
        cl.enqueue_nd_range_kernel(self.queue, kernel, global_size, local_size)

    def _astype(self, a: Array, dtype: Any) -> Array:
        """``a`` converted by PyOpenCL's own kernel (integer and fp64 conversions)."""
        if a.dtype == np.dtype(dtype):
            return a
        self._refuse_capture(f"a conversion {a.dtype} -> {np.dtype(dtype)}")
        return a.astype(dtype)

    def _refuse_capture(self, why: str) -> None:
        if self._graph is not None and not self._graph.refused:
            self._graph.refused = why

    def _float(self, tensor: Array, op: str) -> DType:
        dtype = self.dtype_of(tensor)
        if dtype not in _STORAGE:
            raise UnsupportedOpError(self.name, op, f"dtype {dtype.value}")
        return dtype

    def _logits(self, logits: Array, op: str) -> None:
        if logits.dtype != np.float32 or not self._plain(logits) or len(logits.shape) != 2:
            raise ValueError(f"{op} takes contiguous fp32 logits (B, V) that start their buffer")

    @staticmethod
    def _plain(a: Array) -> bool:
        """Can a kernel take ``a.data`` as it is: contiguous, starting its buffer?"""
        return a.offset == 0 and a.flags.c_contiguous

    def _contig(self, a: Array) -> Array:
        """``a`` itself when plain, else a plain copy."""
        if self._plain(a):
            return a
        if not a.flags.forc:
            raise ValueError(
                "the OpenCL backend takes contiguous tensors (strided views are not made here)"
            )
        return self.copy_(cla.empty(self.queue, a.shape, a.dtype, allocator=self.allocator), a)

    def _as(self, a: Array, dtype: DType) -> Array:
        """``a`` as a plain array of ``dtype``: ``a`` itself when it is one already, else a new
        array (a copy, converted when ``a`` is another type)."""
        if self.dtype_of(a) is dtype:
            return self._contig(a)
        return self.copy_(self.empty(a.shape, dtype), a)

    def _uploaded(
        self,
        meta: AttentionMetadata | SamplingMetadata | PenaltyMetadata,
        key: str,
        sources: tuple[np.ndarray, ...],
        derive: Callable[[], tuple[np.ndarray, ...]] | None = None,
    ) -> tuple[Array, ...]:
        """Device copies of ``derive()`` (default: of ``sources``), kept in
        ``meta.device_cache[key]`` and remade when the host ``sources`` changed: a runner may
        update one metadata object in place from step to step (captured decode batches)."""
        graph = self._graph
        first_in_graph = graph is not None and (id(meta), key) not in graph.uploads
        entry = meta.device_cache.get(key)
        if (
            entry is not None
            and not first_in_graph
            and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(entry[0], sources))
        ):
            return entry[1]

        def host_arrays() -> tuple[np.ndarray, ...]:
            return derive() if derive is not None else sources

        uploaded = tuple(self._upload(a) for a in host_arrays())
        meta.device_cache[key] = (tuple(a.copy() for a in sources), uploaded)
        if graph is not None:
            # A replay uploads the metadata object's current values into the same buffers.
            graph.uploads.add((id(meta), key))
            graph.keep.append(meta)
            graph.steps.append(partial(self._reupload, uploaded, host_arrays))
        return uploaded

    def _reupload(
        self, targets: tuple[Array, ...], host_arrays: Callable[[], tuple[np.ndarray, ...]]
    ) -> None:
        for target, host in zip(targets, host_arrays(), strict=True):
            if tuple(target.shape) != host.shape:
                raise ValueError(
                    "a captured graph's metadata changed shape: "
                    f"{tuple(target.shape)} -> {host.shape}"
                )
            target.set(np.ascontiguousarray(host, dtype=target.dtype), queue=self.queue)

    def _upload(self, host: np.ndarray) -> Array:
        return cla.to_device(self.queue, np.ascontiguousarray(host), allocator=self.allocator)

    def _target(
        self, out: Array | None, shape: Sequence[int], dtype: DType
    ) -> tuple[Array, Array | None]:
        """Where a kernel writes its result, and the ``out`` to copy it into afterwards
        (kernels write only to plain arrays; an ``out`` view at an offset gets a copy)."""
        if out is None:
            return self.empty(shape, dtype), None
        if tuple(out.shape) != tuple(int(s) for s in shape) or self.dtype_of(out) is not dtype:
            raise ValueError(
                f"out is {out.shape} {out.dtype}; expected {tuple(shape)} {dtype.value}"
            )
        if self._plain(out):
            return out, None
        return self.empty(shape, dtype), out

    def _deliver(self, result: Array, out: Array | None) -> Array:
        return result if out is None else self.copy_(out, result)


@dataclass(eq=False)
class OpenCLGraph(CapturedGraph):
    """What :meth:`OpenCLBackend.capture_graph` recorded: host-free steps, in order."""

    steps: list[Callable[[], object]] = field(default_factory=list)
    uploads: set[tuple[int, str]] = field(default_factory=set)  # (id(meta), cache key)
    keep: list[Any] = field(default_factory=list)  # metadata objects the ids refer to
    refused: str = ""

    def replay(self) -> None:
        for step in self.steps:
            step()


def _tanh_approximation(approximate: str) -> bool:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', not {approximate!r}")
    return approximate == "tanh"
