"""The CPU backend: the reference operators, with the hot ones replaced by C kernels.

The C kernels (``csrc/cpu_kernels.c``, see ``native.py``) compute the bf16/fp32 linear layers
(torch's GEMV reaches about half the memory bandwidth, and with no AVX512-BF16 its bf16 path is
far slower still), and run the norms (the Gemma one too), rotary embedding, KV-cache writes,
attention, gated activation, Gemma's embedding scale and logit soft cap and the guided-decoding
token mask in one pass each. They also make the decode step
capturable (:meth:`CpuBackend.capture_graph`): replayed as one native call, with no Python per
operator. Where the kernels do not apply (other dtypes, quantized weights) or could not be
built, the torch operators run: oneDNN/MKL GEMMs, torch's fused scaled-dot-product attention.

Batch invariance (:meth:`CpuBackend.batch_invariant`): every C kernel computes a row of its
output from that row alone, in one fixed order of floating-point operations, whatever the
batch. The vendor GEMMs do not (oneDNN and MKL pick their blocking by shape), so where the
backend is batch-invariant every linear layer runs the C kernel (quantized ones dequantized
first, as the reference does), and what is left to torch is arranged so that a row never
depends on the others: GELU one row at a time, the sampler's normalization a per-row scan.
See "Seeded determinism" in ``docs/architecture.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from llm_hal import (
    OPS,
    AttentionMetadata,
    DeviceInfo,
    DType,
    LinearWeight,
    QuantScheme,
    TorchBackend,
)
from llm_hal.backend import CapturedGraph, Tensor
from llm_hal.metadata import SamplingMetadata
from llm_hal.reference import check_soft_cap, dequantize, dtype_rounded
from llm_hal.spec import host_cpu_name

from llm_core_cpu.arena import HugePageArena
from llm_core_cpu.graph import CpuGraph
from llm_core_cpu.native import NativeKernels, native_kernels, unavailable_reason

log = logging.getLogger("llm_core_cpu")

#: dtype codes of the C kernels
_CODES = {torch.float32: 0, torch.bfloat16: 1}
_DTYPES = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16}
#: Above this many tokens a linear layer is compute-bound: oneDNN/MKL GEMMs take over, unless
#: the backend is batch-invariant.
NATIVE_MAX_TOKENS = 64
#: "auto", "1" or "0": the default of the ``batch_invariant`` backend option (``CpuBackend``).
ENV_BATCH_INVARIANT = "LLM_CORE_CPU_BATCH_INVARIANT"


@dataclass(frozen=True, slots=True)
class _NativeLinear:
    """What the linear kernel needs of a prepared dense weight (``LinearWeight.packed``)."""

    weight_ptr: int
    bias_ptr: int | None
    dtype: torch.dtype
    code: int


class CpuBackend(TorchBackend):
    name: ClassVar[str] = "cpu"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset(
        {DType.FP32, DType.BF16, DType.FP16, DType.FP64}
    )

    def __init__(self, use_kernels: bool = True, batch_invariant: bool | None = None) -> None:
        """``batch_invariant`` True: in fp32 and bf16, every linear layer runs on the C kernels
        (whatever its number of tokens), so that no row's result depends on the batch (see
        :meth:`batch_invariant`). False: batches of more than ``NATIVE_MAX_TOKENS`` tokens use
        oneDNN/MKL GEMMs, faster prefill on CPUs with AVX-512. None:
        ``$LLM_CORE_CPU_BATCH_INVARIANT`` ("1", "0" or "auto", the default): invariant in fp32
        always, in bf16 unless the CPU has a bf16 GEMM (AVX512-BF16 / AMX), where oneDNN
        prefills 3-4.5x faster than the C kernels (docs/performance.md)."""
        super().__init__("cpu")
        self._nk: NativeKernels | None = native_kernels() if use_kernels else None
        if self._nk is not None:
            self._nk.set_threads(torch.get_num_threads())
        self._graph: CpuGraph | None = None
        self._arena = HugePageArena()
        try:
            self._fast_bf16_gemm = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            self._fast_bf16_gemm = False
        # bf16 prefill GEMMs: oneDNN where the CPU has bf16 instructions; elsewhere the C
        # kernel (torch's bf16 GEMM is slow there, and its fp32 one needs a weight upcast).
        self._native_gemm = not self._fast_bf16_gemm
        if batch_invariant is None:
            batch_invariant = parse_batch_invariant(os.environ.get(ENV_BATCH_INVARIANT, "auto"))
        # The torch dtypes this backend is batch-invariant in: only the C kernels are.
        invariant = set(_CODES) if self._nk is not None and batch_invariant is not False else set()
        if batch_invariant is None and self._fast_bf16_gemm:
            invariant.discard(torch.bfloat16)  # auto: oneDNN's bf16 GEMM prefills 3-4.5x faster
        self._invariant = frozenset(invariant)

    def batch_invariant(self, dtype: DType) -> bool:
        """True in the dtypes where every operator computes each row of its output from that row
        alone, in one fixed order whatever the batch (with query and KV caches of one dtype,
        as the engine allocates them): fp32, and bf16 unless the backend was built with
        ``batch_invariant=None`` on a CPU with a bf16 GEMM, or False (see ``__init__``); never
        without the C kernels, nor in fp16 and fp64 (torch operators)."""
        return dtype in _DTYPES and _DTYPES[dtype] in self._invariant

    def device_info(self) -> DeviceInfo:
        invariant = [d.value for d, t in _DTYPES.items() if t in self._invariant]
        props = {
            "threads": str(torch.get_num_threads()),
            "kernels": self.kernels,
            "batch_invariant": ", ".join(invariant) or "no",
        }
        return DeviceInfo(0, host_cpu_name(), self.memory_info().total, props)

    @property
    def kernels(self) -> str:
        """Which kernels run: the C kernels (with the vector width) or why not."""
        if self._nk is not None:
            return f"C kernels ({'AVX2' if self._nk.simd_width == 8 else 'scalar'})"
        return f"torch operators ({unavailable_reason() or 'C kernels turned off'})"

    # ------------------------------------------------------------------------------------------
    # capture
    # ------------------------------------------------------------------------------------------

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        if self._nk is None:
            fn()
            return None
        graph = CpuGraph(self._nk)
        own_class = type(self)
        self._graph = graph
        self.__class__ = _capturing_class(own_class)
        try:
            fn()
        finally:
            self.__class__ = own_class
            self._graph = None
        return graph.finish()

    def _run(self, kernel: str, args: tuple[Any, ...], keep: tuple[Any, ...]) -> None:
        if self._graph is not None:
            self._graph.record(kernel, args, keep)
        assert self._nk is not None
        getattr(self._nk, kernel.removeprefix("llm_"))(*args)

    def _eager(self, op: str) -> None:
        """An operator about to run in torch: a capture in progress cannot replay it."""
        if self._graph is not None:
            self._graph.fail(f"{op} ran as torch code, which replay would skip")

    def _out(
        self, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``out`` if a kernel can write it (else None), or a new tensor."""
        if out is None:
            return torch.empty(shape, dtype=dtype)
        if out.dtype == dtype and tuple(out.shape) == shape and out.stride(-1) == 1:
            return out
        return None

    # ------------------------------------------------------------------------------------------
    # memory
    # ------------------------------------------------------------------------------------------

    def copy_(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        sc, dc = _CODES.get(src.dtype), _CODES.get(dst.dtype)
        if (
            self._nk is not None
            and sc is not None
            and dc is not None
            and src.shape == dst.shape
            and src.is_contiguous()
            and dst.is_contiguous()
        ):
            args = (src.data_ptr(), sc, dst.data_ptr(), dc, src.numel())
            self._run("llm_convert", args, (src, dst))
            return dst
        self._eager("copy_")
        return dst.copy_(src)

    def reshape(self, tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        y = tensor.reshape(tuple(shape))
        if self._graph is not None and (
            y.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
        ):
            self._eager("reshape (a copy, not a view)")
        return y

    def prepare_linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        scheme: QuantScheme = QuantScheme.NONE,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> LinearWeight:
        prepared = super().prepare_linear(weight, bias, scheme, scales, zeros, group_size)
        code = _CODES.get(weight.dtype)
        if scheme is QuantScheme.NONE and code is not None and weight.dim() == 2:
            # Each decode step streams every weight once: keep them on huge pages.
            prepared.weight = self._arena.place(weight) if self._nk is not None else weight
            if bias is not None and bias.dtype == weight.dtype:
                prepared.bias = bias.contiguous()
            elif bias is not None:
                return prepared
            bias_ptr = None if prepared.bias is None else prepared.bias.data_ptr()
            weight_ptr = prepared.weight.data_ptr()
            prepared.packed = _NativeLinear(weight_ptr, bias_ptr, weight.dtype, code)
        return prepared

    # ------------------------------------------------------------------------------------------
    # operators
    # ------------------------------------------------------------------------------------------

    def embedding(
        self, ids: torch.Tensor, table: torch.Tensor, out: Tensor | None = None
    ) -> Tensor:
        code = _CODES.get(table.dtype)
        if (
            self._nk is not None
            and code is not None
            and ids.dtype in (torch.int32, torch.int64)
            and ids.is_contiguous()
            and table.is_contiguous()
            and (out is None or out.is_contiguous())
        ):
            t, h = ids.shape[0], table.shape[1]
            y = self._out(out, (t, h), table.dtype)
            if y is not None:
                args = (ids.data_ptr(), int(ids.dtype == torch.int64), table.data_ptr(), h, t,
                        y.data_ptr(), code)  # fmt: skip
                self._run("llm_embedding", args, (ids, table, y))
                return y
        self._eager("embedding")
        return super().embedding(ids, table, out)

    def linear(self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        native = weight.packed
        if (
            isinstance(native, _NativeLinear)
            and self._nk is not None
            and x.dtype == native.dtype
            and (
                x.shape[0] <= NATIVE_MAX_TOKENS
                or x.dtype in self._invariant
                or self._graph is not None
                or (self._native_gemm and x.dtype == torch.bfloat16)
            )
        ):
            if x.stride(-1) != 1 and x.dtype in self._invariant:
                self._eager("linear (an input with strided rows)")
                x = x.contiguous()
            if x.stride(-1) == 1:
                t, k = x.shape
                n = weight.out_features
                y = self._out(out, (t, n), x.dtype)
                if y is None and x.dtype in self._invariant:
                    self._eager("linear (an output the kernel cannot write)")
                    assert out is not None
                    return out.copy_(self.linear(x, weight))
                if y is not None and t > 0:
                    args = (x.data_ptr(), x.stride(0), t, k, native.weight_ptr, n, native.bias_ptr,
                            y.data_ptr(), y.stride(0), native.code)  # fmt: skip
                    self._run("llm_linear", args, (x, weight, y))
                    return y
        self._eager("linear")
        if x.dtype in self._invariant and x.shape[0] > 0:
            return self._invariant_linear(x, weight, out)
        if weight.scheme is not QuantScheme.NONE or weight.weight.dtype != x.dtype:
            return super().linear(x, weight, out)
        w, b = weight.weight, weight.bias
        if x.dtype == torch.bfloat16 and not self._fast_bf16_gemm:
            # Without AVX512-BF16, oneDNN's bf16 GEMM is orders of magnitude slower than MKL's
            # fp32 one: upcast (the products are exact in fp32 either way), round once.
            y = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
            return y if out is None else out.copy_(y)
        if out is None:
            return F.linear(x, w, b)
        if b is None:
            return torch.matmul(x, w.T, out=out)
        return torch.addmm(b, x, w.T, out=out)

    def _invariant_linear(
        self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None
    ) -> Tensor:
        """A quantized (or mixed-dtype) linear layer, batch-invariant: the reference's fp32
        weight and its activation quantization (W8A8: per token), and the products summed by
        the fp32 C kernel (torch's GEMMs would pick their summation order by shape)."""
        xf = x.float()
        if weight.scheme is QuantScheme.W8A8:
            assert weight.scales is not None, "prepare_linear guarantees W8A8 scales"
            a_scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (T, 1)
            xq = torch.clamp(torch.round(xf / a_scale), -127, 127)
            y = self._matmul_f32(xq, weight.weight.float())
            y = y * a_scale * weight.scales.float().reshape(1, -1)
        else:
            y = self._matmul_f32(xf, dequantize(weight).float())
        if weight.bias is not None:
            y = y + weight.bias.float()
        y = y.to(x.dtype)
        return y if out is None else out.copy_(y)

    def _matmul_f32(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``x (T, K) @ w (N, K)^T`` in fp32 by the C linear kernel: each output summed in
        the kernel's one order, whatever T."""
        x, w = x.float().contiguous(), w.float().contiguous()
        (t, k), n = x.shape, w.shape[0]
        y = torch.empty((t, n), dtype=torch.float32)
        if t > 0:
            args = (x.data_ptr(), k, t, k, w.data_ptr(), n, None, y.data_ptr(), n, _CODES[y.dtype])
            self._run("llm_linear", args, (x, w, y))
        return y

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        done = self._native_norm("llm_rms_norm", x, weight, eps, residual, out)
        if done is not None:
            return done
        self._eager("rms_norm")
        return self._torch_rms_norm(x, weight, eps, residual, out)

    def gemma_rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        done = self._native_norm("llm_gemma_rms_norm", x, weight, eps, residual, out)
        if done is not None:
            return done
        self._eager("gemma_rms_norm")
        s = None if residual is None else TorchBackend.add(self, x, residual)
        normed = x if s is None else s
        norm = super().gemma_rms_norm
        if x.dtype in self._invariant and x.dim() == 2:
            # torch may split one row's sum of squares across threads when the rows are few:
            # one row at a time, each row is summed the same way whatever the batch.
            y = _into(out, _rows(normed, lambda r: norm(r, weight, eps)[0]))
        else:
            y = norm(normed, weight, eps, None, out)[0]
        return y, s

    def _native_norm(
        self,
        kernel: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        out: Tensor | None,
    ) -> tuple[Tensor, Tensor | None] | None:
        """``rms_norm`` or ``gemma_rms_norm`` (``kernel``) by its C kernel, or None where the
        kernel cannot take these tensors."""
        code = _CODES.get(x.dtype)
        if (
            self._nk is None
            or code is None
            or x.dim() != 2
            or x.stride(-1) != 1
            or weight.dtype != x.dtype
            or not weight.is_contiguous()
            or (residual is not None and (residual.dtype != x.dtype or residual.stride(-1) != 1))
        ):
            return None
        t, h = x.shape
        y = self._out(out, (t, h), x.dtype)
        if y is None:
            return None
        s = None if residual is None else torch.empty((t, h), dtype=x.dtype)
        args = (
            x.data_ptr(), x.stride(0),
            None if residual is None else residual.data_ptr(),
            0 if residual is None else residual.stride(0),
            weight.data_ptr(), y.data_ptr(), y.stride(0),
            None if s is None else s.data_ptr(), h,
            t, h, eps, code,
        )  # fmt: skip
        self._run(kernel, args, (x, residual, weight, y, s))
        return y, s

    def _torch_rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None,
        out: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        if residual is not None:
            s = x + residual if x.dtype == torch.float32 else (x.float() + residual).to(x.dtype)
        else:
            s = x
        sf = s.float() if s.dtype != torch.float64 else s
        variance = sf.pow(2).mean(dim=-1, keepdim=True)
        normed = (sf * torch.rsqrt(variance + eps)).to(x.dtype)
        if out is None:
            y = (
                normed * weight
                if weight.dtype == x.dtype
                else (normed.float() * weight).to(x.dtype)
            )
        else:
            y = torch.mul(normed, weight, out=out)
        return y, (None if residual is None else s)

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        head_size: int,
        is_neox_style: bool,
    ) -> tuple[Tensor, Tensor]:
        code = _CODES.get(q.dtype)
        if (
            self._nk is not None
            and code is not None
            and k.dtype == q.dtype
            and positions.dtype == torch.int64
            and positions.is_contiguous()
            and cos_sin_cache.dtype == torch.float32
            and cos_sin_cache.is_contiguous()
            and q.stride(-1) == 1
            and k.stride(-1) == 1
        ):
            t = q.shape[0]
            args = (
                positions.data_ptr(), q.data_ptr(), q.stride(0), q.shape[1] // head_size,
                k.data_ptr(), k.stride(0), k.shape[1] // head_size, cos_sin_cache.data_ptr(),
                cos_sin_cache.shape[1], head_size, int(is_neox_style), t, code,
            )  # fmt: skip
            self._run("llm_rotary", args, (positions, q, k, cos_sin_cache))
            return q, k
        self._eager("rotary_embedding")
        return super().rotary_embedding(positions, q, k, cos_sin_cache, head_size, is_neox_style)

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        code = _CODES.get(key_cache.dtype)
        if (
            self._nk is not None
            and code is not None
            and key.dtype == value.dtype == key_cache.dtype == value_cache.dtype
            and key.stride(-1) == 1
            and value.stride(-1) == 1
            and key_cache.is_contiguous()
            and value_cache.is_contiguous()
        ):
            slots = meta.slot_mapping
            args = (key.data_ptr(), key.stride(0), value.data_ptr(), value.stride(0),
                    key_cache.data_ptr(), value_cache.data_ptr(), slots.ctypes.data,
                    len(slots), key_cache.shape[2] * key_cache.shape[3], code)  # fmt: skip
            self._run("llm_cache_write", args, (key, value, key_cache, value_cache, meta, slots))
            return
        self._eager("reshape_and_cache")
        slots_rows = meta.device_cache.get("cpu.slots")
        if slots_rows is None:
            valid = meta.slot_mapping >= 0
            rows = torch.from_numpy(valid.nonzero()[0]) if not valid.all() else None
            slots_rows = (torch.from_numpy(meta.slot_mapping[valid]), rows)
            meta.device_cache["cpu.slots"] = slots_rows
        index, rows = slots_rows
        hkv, d = key_cache.shape[2], key_cache.shape[3]
        k = key.reshape(-1, hkv, d) if rows is None else key.reshape(-1, hkv, d)[rows]
        v = value.reshape(-1, hkv, d) if rows is None else value.reshape(-1, hkv, d)[rows]
        key_cache.view(-1, hkv, d).index_copy_(0, index, k.to(key_cache.dtype))
        value_cache.view(-1, hkv, d).index_copy_(0, index, v.to(value_cache.dtype))

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
        code = self._attention_code(query, key_cache, value_cache)
        if code is not None:
            t, d = query.shape[0], key_cache.shape[3]
            y = self._out(out, (t, query.shape[1]), query.dtype)
            if y is not None:
                row_seq, row_lens = _prefill_rows(meta)
                self._attention(query, key_cache, value_cache, meta, row_seq, row_lens, scale,
                                sliding_window, logits_soft_cap, y, code)  # fmt: skip
                return y
        self._eager("paged_attention_prefill")
        d = key_cache.shape[3]
        t = query.shape[0]
        q_all = query.reshape(t, -1, d)  # (T, Hq, D)
        result = out.view(t, -1, d) if out is not None else torch.empty_like(q_all)
        # Without AVX512-BF16 torch's bf16 attention kernel is slow: compute in fp32.
        work = torch.float32 if query.dtype == torch.bfloat16 and not self._fast_bf16_gemm else None
        starts = meta.query_start_loc
        for b in range(meta.num_seqs):
            q0, q1 = int(starts[b]), int(starts[b + 1])
            if q1 == q0:
                continue
            length = int(meta.seq_lens[b])
            k = self._gather_context(key_cache, meta.block_tables[b], length)  # (L, Hkv, D)
            v = self._gather_context(value_cache, meta.block_tables[b], length)
            q = q_all[q0:q1].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq, D)
            if work is not None:
                q = q.to(work)
            k = k.transpose(0, 1).unsqueeze(0).to(q.dtype)  # (1, Hkv, L, D)
            v = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
            # 4-D inputs take torch's fused CPU kernel. Always an explicit mask: with
            # is_causal=True torch's short-sequence path turns a NaN query row into zeros, and the
            # HAL contract (and the conformance suite) require NaN to propagate.
            mask = _causal_mask(q1 - q0, length, sliding_window)
            o = _sdpa(q, k, v, mask, scale, logits_soft_cap)[0]  # (Hq, Lq, D)
            result[q0:q1] = o.transpose(0, 1)
        return result.reshape(t, -1)

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
        code = self._attention_code(query, key_cache, value_cache)
        if code is not None:
            y = self._out(out, (meta.num_seqs, query.shape[1]), query.dtype)
            if y is not None:
                self._attention(query, key_cache, value_cache, meta, None, meta.seq_lens, scale,
                                sliding_window, logits_soft_cap, y, code)  # fmt: skip
                return y
        self._eager("paged_attention_decode")
        return self._torch_attention_decode(query, key_cache, value_cache, meta, scale,
                                            sliding_window, logits_soft_cap, out)  # fmt: skip

    def _attention_code(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> int | None:
        """The dtype code for the C attention kernel, or None when it cannot take these
        inputs (no kernels, mixed dtypes, non-contiguous caches)."""
        code = _CODES.get(query.dtype)
        if (
            self._nk is None
            or code is None
            or not query.dtype == key_cache.dtype == value_cache.dtype
            or query.stride(-1) != 1
            or not key_cache.is_contiguous()
            or not value_cache.is_contiguous()
        ):
            return None
        return code

    def _attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        row_seq: np.ndarray | None,
        row_lens: np.ndarray,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        y: torch.Tensor,
        code: int,
    ) -> None:
        """The attention kernel over rows of the query (see ``llm_attention``): the arrays it
        reads at run time are the metadata's own, so a captured call sees their updates."""
        d = key_cache.shape[3]
        tables = meta.block_tables
        args = (
            query.data_ptr(), query.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
            len(row_lens), query.shape[1] // d, key_cache.shape[2], d, key_cache.shape[1],
            tables.ctypes.data, tables.shape[1],
            None if row_seq is None else row_seq.ctypes.data, row_lens.ctypes.data,
            scale, logits_soft_cap or 0.0, sliding_window or 0, y.data_ptr(), y.stride(0), code,
        )  # fmt: skip
        keep = (query, key_cache, value_cache, meta, tables, row_seq, row_lens, y)
        self._run("llm_attention", args, keep)

    def _torch_attention_decode(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        logits_soft_cap: float | None,
        out: Tensor | None,
    ) -> Tensor:
        b, d = meta.num_seqs, key_cache.shape[3]
        block_size = key_cache.shape[1]
        # Sliding-window and global layers share one step's metadata: one entry per window.
        key = f"cpu.decode.{block_size}.{sliding_window or 0}"
        idx, mask = meta.device_cache.get(key, (None, None))
        if idx is None:
            n_blocks = -(-meta.max_seq_len // block_size)
            idx = torch.from_numpy(meta.block_tables[:, :n_blocks].astype("int64"))  # (B, nb)
            lens = torch.from_numpy(meta.seq_lens.astype("int64")).unsqueeze(1)
            # Table entries past a sequence's own blocks may hold anything: read block 0 there
            # (masked out below) rather than index with them.
            idx = idx.masked_fill(torch.arange(n_blocks) * block_size >= lens, 0)
            pos = torch.arange(n_blocks * block_size)
            allowed = pos.unsqueeze(0) < lens  # (B, L)
            if sliding_window:
                allowed &= pos.unsqueeze(0) > lens - 1 - sliding_window
            mask = allowed[:, None, None, :]  # (B, 1, 1, L)
            meta.device_cache[key] = (idx, mask)
        hkv = key_cache.shape[2]
        k = key_cache[idx].reshape(b, -1, hkv, d).transpose(1, 2)  # (B, Hkv, L, D)
        v = value_cache[idx].reshape(b, -1, hkv, d).transpose(1, 2)
        q = query.reshape(b, -1, 1, d)  # (B, Hq, 1, D)
        o = _sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, scale, logits_soft_cap)  # (B, Hq, 1, D)
        o = o.reshape(b, -1)
        if out is not None:
            out.copy_(o)
            return out
        return o

    def silu_and_mul(self, x: torch.Tensor, out: Tensor | None = None) -> Tensor:
        code = _CODES.get(x.dtype)
        if self._nk is not None and code is not None and x.dim() == 2 and x.stride(-1) == 1:
            t, i = x.shape[0], x.shape[1] // 2
            y = self._out(out, (t, i), x.dtype)
            if y is not None:
                args = (x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), t, i, code)
                self._run("llm_silu_mul", args, (x, y))
                return y
        self._eager("silu_and_mul")
        d = x.shape[-1] // 2
        gate, up = x[..., :d], x[..., d:]
        if x.dtype in (torch.float32, torch.float64):
            return torch.mul(F.silu(gate), up, out=out) if out is not None else F.silu(gate) * up
        return super().silu_and_mul(x, out)

    def gather_rows(
        self, x: torch.Tensor, indices: torch.Tensor, out: Tensor | None = None
    ) -> Tensor:
        code = _CODES.get(x.dtype)
        if (
            self._nk is not None
            and code is not None
            and x.dim() == 2
            and x.stride(-1) == 1
            and indices.dtype == torch.int64
            and indices.is_contiguous()
            and (out is None or out.is_contiguous())
        ):
            b, h = indices.shape[0], x.shape[1]
            y = self._out(out, (b, h), x.dtype)
            if y is not None:
                args = (x.data_ptr(), x.stride(0), indices.data_ptr(), b, h, y.data_ptr(), code)
                self._run("llm_gather_rows", args, (x, indices, y))
                return y
        self._eager("gather_rows")
        return super().gather_rows(x, indices, out)

    def gelu_and_mul(
        self, x: torch.Tensor, approximate: str = "none", out: Tensor | None = None
    ) -> Tensor:
        if x.dtype in self._invariant and x.dim() == 2:
            # torch's vectorized GELU and its scalar tail differ in the last bit: one row at a
            # time, each row takes the same path whatever the batch.
            rows = _rows(x, lambda r: super(CpuBackend, self).gelu_and_mul(r, approximate))
            return _into(out, rows)
        return super().gelu_and_mul(x, approximate, out)

    def gelu(self, x: torch.Tensor, approximate: str = "none", out: Tensor | None = None) -> Tensor:
        if x.dtype in self._invariant and x.dim() == 2:
            return _into(out, _rows(x, lambda r: super(CpuBackend, self).gelu(r, approximate)))
        return super().gelu(x, approximate, out)

    def scale(self, x: torch.Tensor, factor: float, out: Tensor | None = None) -> Tensor:
        # An exact product of two values of x's dtype, rounded once: the kernel and torch agree
        # bit for bit, so the torch path below is batch-invariant too.
        y = self._map("llm_scale", x, dtype_rounded(factor, x.dtype), out)
        if y is not None:
            return y
        self._eager("scale")
        return super().scale(x, factor, out)

    def soft_cap(self, x: torch.Tensor, cap: float, out: Tensor | None = None) -> Tensor:
        check_soft_cap(cap)
        y = self._map("llm_soft_cap", x, cap, out)
        if y is not None:
            return y
        self._eager("soft_cap")
        if x.dtype in self._invariant and x.dim() == 2:
            # torch's vectorized tanh and its scalar tail may differ in the last bit.
            return _into(out, _rows(x, lambda r: super(CpuBackend, self).soft_cap(r, cap)))
        return super().soft_cap(x, cap, out)

    def _map(
        self, kernel: str, x: torch.Tensor, a: float, out: Tensor | None
    ) -> torch.Tensor | None:
        """An elementwise map of rows (``llm_soft_cap``, ``llm_scale``, with its scalar ``a``)
        by its C kernel, or None where the kernel cannot take these tensors."""
        code = _CODES.get(x.dtype)
        if self._nk is None or code is None or x.dim() != 2 or x.stride(-1) != 1:
            return None
        t, n = x.shape
        y = self._out(out, (t, n), x.dtype)
        if y is None:
            return None
        args = (x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), t, n, a, code)
        self._run(kernel, args, (x, y))
        return y

    def moe_experts(
        self,
        x: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: str = "silu",
        out: Tensor | None = None,
    ) -> Tensor:
        if x.dtype not in self._invariant or activation not in ("silu", "gelu"):
            return super().moe_experts(x, w13, w2, topk_weights, topk_ids, activation, out)
        # The reference's loop over experts with its GEMMs on the C kernel and a row-wise
        # activation: an expert's tokens are however many the batch routed to it.
        xf = x.float()
        result = torch.zeros(xf.shape, dtype=torch.float32)
        for e in topk_ids.unique().tolist():
            tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
            h = self._matmul_f32(xf[tok], w13[e])  # (n, 2I)
            act = self.silu_and_mul(h) if activation == "silu" else self.gelu_and_mul(h)
            y = self._matmul_f32(act, w2[e])
            result.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
        return _into(out, result.to(x.dtype))

    # ------------------------------------------------------------------------------------------
    # logits processing
    # ------------------------------------------------------------------------------------------

    def filtered_probs(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        if not self._invariant or logits.dtype != torch.float32:
            return super().filtered_probs(logits, meta)
        # The reference's filters, but the kept probabilities normalized by a per-row scan:
        # torch sums one row across threads and many rows one per thread, so a row's sum (and
        # then its draw) would depend on the batch; a cumulative sum runs each row in order.
        dev, vocab = logits.device, logits.shape[1]
        temp = torch.from_numpy(meta.temperature).to(dev).unsqueeze(1)
        greedy = temp == 0
        x = logits / torch.where(greedy, torch.ones_like(temp), temp)
        top_k = torch.from_numpy(meta.top_k).to(dev)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long()
        sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
        x = x.masked_fill(x < sorted_x.gather(1, (k - 1).unsqueeze(1)), float("-inf"))
        probs = torch.softmax(x, dim=-1)
        sorted_p = probs.gather(1, order)
        top_p = torch.from_numpy(meta.top_p).to(dev).unsqueeze(1)
        # Keep a token while the mass of strictly more likely tokens is below top_p.
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        drop_sorted[:, 0] = False
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0)
        min_p = torch.from_numpy(meta.min_p).to(dev).unsqueeze(1)
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        probs = probs / probs.cumsum(dim=-1)[:, -1:]
        one_hot = F.one_hot(logits.argmax(dim=-1), vocab).to(probs.dtype)
        return torch.where(greedy, one_hot, probs)

    def sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> Tensor:
        rows, vocab = logits.shape
        if (
            meta.all_greedy
            and self._nk is not None
            and logits.dtype == torch.float32
            and logits.stride(-1) == 1
            and rows > 0
            and vocab > 0
        ):
            ids = torch.empty(rows, dtype=torch.int64)
            args = (logits.data_ptr(), logits.stride(0), rows, vocab, ids.data_ptr())
            self._run("llm_argmax_rows", args, (logits, ids))
            return ids
        self._eager("sample")
        return super().sample(logits, meta)

    def apply_token_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> Tensor:
        if logits.dim() != 2 or bitmask.dim() != 2:
            raise ValueError("apply_token_bitmask takes logits (B, V) and a bitmask (B, W)")
        rows, vocab = logits.shape
        if bitmask.shape[0] != rows or bitmask.shape[1] * 32 < vocab:
            raise ValueError(
                f"apply_token_bitmask: a bitmask (B, ceil(V / 32)) = ({rows}, {-(-vocab // 32)}) "
                f"for logits {tuple(logits.shape)}, not {tuple(bitmask.shape)}"
            )
        if (
            self._nk is not None
            and logits.dtype == torch.float32
            and logits.stride(-1) == 1
            and bitmask.dtype == torch.int32
            and bitmask.stride(-1) == 1
        ):
            args = (
                logits.data_ptr(), logits.stride(0), bitmask.data_ptr(), bitmask.stride(0),
                rows, vocab,
            )  # fmt: skip
            self._run("llm_token_bitmask", args, (logits, bitmask))
            return logits
        self._eager("apply_token_bitmask")
        return super().apply_token_bitmask(logits, bitmask)


def parse_batch_invariant(value: str) -> bool | None:
    """The ``batch_invariant`` setting: None for "auto", else on unless "0", "false", "off" or
    "no"."""
    value = value.strip().lower()
    if value == "auto":
        return None
    return value not in ("0", "false", "off", "no")


def _into(out: Tensor | None, result: torch.Tensor) -> Tensor:
    return result if out is None else out.copy_(result)


def _rows(x: torch.Tensor, fn: Callable[[torch.Tensor], Tensor]) -> torch.Tensor:
    """``fn`` applied to each row of ``x`` (as a (1, ...) tensor) on its own, concatenated."""
    return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])]) if x.shape[0] else fn(x)


def _prefill_rows(meta: AttentionMetadata) -> tuple[np.ndarray, np.ndarray]:
    """For every new token of the step: its sequence and how many positions it sees (its own
    position + 1), int32; computed once per step and shared by every layer."""
    rows = meta.device_cache.get("cpu.prefill_rows")
    if rows is None:
        q_lens = meta.query_lens
        seq = np.repeat(np.arange(meta.num_seqs, dtype=np.int32), q_lens)
        first = np.repeat(meta.seq_lens - q_lens, q_lens)  # position of each sequence's 1st new
        offset = np.arange(meta.num_tokens) - np.repeat(meta.query_start_loc[:-1], q_lens)
        rows = (seq, (first + offset + 1).astype(np.int32))
        meta.device_cache["cpu.prefill_rows"] = rows
    return rows


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    soft_cap: float | None,
) -> torch.Tensor:
    """Attention of q (..., Hq, Lq, D) over k, v (..., Hkv, L, D) where ``mask`` (broadcast to
    (..., Lq, L)) is True: torch's fused kernel, or without one for soft-capped scores
    (``soft_cap * tanh(score / soft_cap)``, which it cannot apply), the same in fp32 (fp64 for
    fp64) matmuls."""
    if not soft_cap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[-3] // k.shape[-3]
    k = k.to(acc).repeat_interleave(group, dim=-3)  # (..., Hq, L, D)
    v = v.to(acc).repeat_interleave(group, dim=-3)
    scores = (q.to(acc) @ k.transpose(-1, -2)) * scale  # (..., Hq, Lq, L)
    scores = (soft_cap * torch.tanh(scores / soft_cap)).masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


def _causal_mask(q_len: int, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """(Lq, L) bool: new token i (position kv_len - q_len + i) sees keys at or before it."""
    q_pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    k_pos = torch.arange(kv_len).unsqueeze(0)
    allowed = k_pos <= q_pos
    if sliding_window:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


# ----------------------------------------------------------------------------------------------
# capture guard
# ----------------------------------------------------------------------------------------------

#: Methods that record a kernel while capturing (or fail the capture themselves).
_RECORDING = frozenset({"embedding", "linear", "rms_norm", "gemma_rms_norm", "rotary_embedding",
                        "reshape_and_cache", "paged_attention_decode", "silu_and_mul",
                        "scale", "soft_cap", "gather_rows", "copy_"})  # fmt: skip
#: Everything else that computes or moves data: it cannot be replayed, so it fails a capture.
_GUARDED: tuple[str, ...] = (*OPS, "from_host", "to_host", "allocate_kv_cache", "prepare_linear")
_capturing_classes: dict[type, type] = {}


def _capturing_class(cls: type[CpuBackend]) -> type[CpuBackend]:
    """``cls`` while it records: its operators without a kernel to record fail the capture
    instead of silently running only once. Swapped in for the duration of a capture."""
    sub = _capturing_classes.get(cls)
    if sub is None:
        guards = {n: _uncapturable(n, getattr(cls, n)) for n in _GUARDED if n not in _RECORDING}
        sub = type(f"Capturing{cls.__name__}", (cls,), guards)
        _capturing_classes[cls] = sub
    return sub


def _uncapturable(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: CpuBackend, *args: Any, **kwargs: Any) -> Any:
        self._eager(name)
        return method(self, *args, **kwargs)

    call.__name__ = name
    return call
