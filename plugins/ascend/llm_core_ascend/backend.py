"""The Ascend backend: the reference operators on torch's ``npu`` device, with the hot ones
replaced by torch-npu's fused operators.

Every torch-npu operator is called through ``self.npu``, the operator namespace handed in at
construction (``torch.ops.npu``; see :mod:`llm_core_ascend.ops`), with the argument names of
torch-npu's schemas. Where a fused operator cannot take a case (fp32 attention, a block size
the paged kernel refuses, logit soft-capping, a quantization group it cannot express), the
operator runs the inherited reference code on the NPU instead and says so once in the log.

Layouts: the KV cache is the HAL's logical ``(blocks, block_size, Hkv, D)`` in ND format, which
the paged attention kernel reads as ``(blocks, block_size, Hkv * D)``; quantized weights and,
with the ``nz_weights`` option, dense weights are kept in the forms the NPU matmuls take, in
``LinearWeight.packed``.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from llm_hal import AttentionMetadata, DType, LinearWeight, QuantScheme, TorchBackend
from llm_hal.backend import CapturedGraph, Tensor
from llm_hal.reference import _into
from llm_hal.spec import DeviceInfo

from llm_core_ascend import graphs
from llm_core_ascend.ops import ACL_FORMAT_FRACTAL_NZ, load

log = logging.getLogger(__name__)

#: Activation dtypes torch-npu's fused attention, swiglu-free matmuls and quant ops take.
HALF_DTYPES = (torch.float16, torch.bfloat16)
NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The attention kernel's sparse modes 2-4 take one pre-built mask of this size, True (masked)
#: above the diagonal, whatever the sequence lengths.
MASK_SIZE = 2048
SPARSE_RIGHT_DOWN_CAUSAL = 3  # causal, the last query aligned with the last key
SPARSE_BAND = 4  # pre_tokens / next_tokens around that same diagonal: sliding windows
#: Page-attention block sizes of npu_fused_infer_attention_score: with several queries per
#: sequence a multiple of 128, for decode a multiple of 16; at most 512 either way.
PREFILL_BLOCK_ALIGN = 128
DECODE_BLOCK_ALIGN = 16
MAX_BLOCK_SIZE = 512
#: npu_apply_rotary_pos_emb (q and k in one call) takes only these head sizes on Atlas A2/A3;
#: others go through npu_rotary_mul.
FUSED_ROPE_HEAD_SIZES = (64, 128)
#: npu_weight_quant_batchmatmul's per-group quantization: groups of a multiple of 32.
QUANT_GROUP_ALIGN = 32


@dataclass(slots=True)
class QuantizedWeight:
    """The private form of a quantized linear weight (``LinearWeight.packed``).

    ``weight`` is what the NPU matmul takes: a transposed ``(K, N)`` view of the int8 weight,
    or of the int4 weight packed eight to an int32. Scales, offsets and bias are kept in the
    dtype each activation dtype needs, made on first use.
    """

    weight: torch.Tensor
    scales: torch.Tensor  # (K // group, N) or (1, N) for W8A16/W4A16; (N,) fp32 for W8A8
    offsets: torch.Tensor | None  # added to the weight before scaling, as the scales
    group_size: int  # 0 = one group over all of K
    bias: torch.Tensor | None
    by_dtype: dict[tuple[str, torch.dtype], torch.Tensor | None] = field(default_factory=dict)

    def cast(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        key = (name, dtype)
        if key not in self.by_dtype:
            t = getattr(self, name)
            self.by_dtype[key] = None if t is None else t.to(dtype)
        return self.by_dtype[key]


class AscendBackend(TorchBackend):
    """The HAL on one Ascend NPU (``npu:<index>``), through torch-npu's fused operators."""

    name: ClassVar[str] = "ascend"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset({DType.FP32, DType.FP16, DType.BF16})
    #: The torch.distributed backend of tensor parallelism on Ascend.
    distributed_backend: ClassVar[str] = "hccl"
    #: The KV-cache block size both fused attention paths take (see PREFILL_BLOCK_ALIGN).
    preferred_block_size: ClassVar[int] = PREFILL_BLOCK_ALIGN

    def __init__(
        self,
        device: str | torch.device = "npu:0",
        *,
        ops: Any = None,
        nz_weights: bool = False,
        graph_runtime: Any = None,
    ):
        """``ops``: the namespace holding torch-npu's operators (default: torch-npu's own,
        imported now). ``nz_weights``: store dense linear weights in FRACTAL_NZ format.
        ``graph_runtime``: the namespace with torch-npu's graph API that ``capture_graph``
        records with (default: ``torch.npu`` on an NPU; none elsewhere, so no graphs)."""
        # torch knows the "npu" device type only once torch-npu is imported.
        self.npu = ops if ops is not None else load()
        super().__init__(device)
        self.nz_weights = nz_weights
        self._mask: torch.Tensor | None = None
        self._rope: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._told: set[str] = set()
        if graph_runtime is None and self.device.type == "npu":
            graph_runtime = self._runtime()
        self._graph_runtime = graph_runtime
        self._graph_pool: Any = None
        self._recording: graphs.Recorder | None = None
        #: KV caches handed out, by data pointer: (the cache, its allocation with the scratch
        #: blocks, the blocks handed out); dropped when the cache is.
        self._kv_allocations: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor, int]] = {}
        if self.device.type == "npu":
            self._runtime().set_device(self.device)

    def _runtime(self) -> Any:
        return getattr(torch, self.device.type)

    def _unfused(self, op: str, why: str) -> None:
        """Say once per reason that an operator runs the unfused reference code."""
        if self._recording is not None and op.startswith("paged_attention"):
            # The reference attention reads the host metadata: a graph would freeze it.
            self._recording.refuse(f"{op} runs unfused ({why})")
        if why not in self._told:
            self._told.add(why)
            log.warning("ascend: %s runs the unfused torch path on the NPU: %s", op, why)

    # ------------------------------------------------------------------------------------------
    # device and memory
    # ------------------------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        if self.device.type != "npu":
            return super().device_info()
        index = self.device.index or 0
        runtime = self._runtime()
        _, total = runtime.mem_get_info(self.device)
        return DeviceInfo(index, str(runtime.get_device_name(index)), int(total))

    def synchronize(self) -> None:
        if self.device.type == "npu":
            self._runtime().synchronize(self.device)

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: DType
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The HAL's caches. Where graphs can be recorded, each is the first ``num_blocks``
        blocks of an allocation with scratch blocks past them, where recorded steps write their
        padding rows (see :mod:`llm_core_ascend.graphs`)."""
        if self._graph_runtime is None:
            return super().allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype)
        scratch = -(-graphs.SCRATCH_TOKENS // block_size)
        full = super().allocate_kv_cache(
            num_blocks + scratch, block_size, num_kv_heads, head_size, dtype
        )
        caches = tuple(t[:num_blocks] for t in full)
        for ptr, entry in list(self._kv_allocations.items()):
            if entry[0]() is None:
                del self._kv_allocations[ptr]
        for cache, allocation in zip(caches, full, strict=True):
            self._kv_allocations[cache.data_ptr()] = (weakref.ref(cache), allocation, num_blocks)
        return caches[0], caches[1]

    # ------------------------------------------------------------------------------------------
    # graph mode
    # ------------------------------------------------------------------------------------------

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        """``fn`` recorded as one torch-npu NPUGraph, its attention lengths updated at each
        replay (:mod:`llm_core_ascend.graphs`); None without a graph runtime."""
        runtime = self._graph_runtime
        if runtime is None:
            return super().capture_graph(fn)
        if self._recording is not None:
            raise RuntimeError("capture_graph calls cannot nest")
        if self._graph_pool is None:
            self._graph_pool = runtime.graph_pool_handle()  # shared by every recorded size
        pool = self._graph_pool
        return self._record_or_run(
            fn, lambda: graphs.AscendStepGraph.record(self, runtime, fn, pool), "an NPU graph"
        )

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
        if self._recording is not None:
            # The reference picks the experts to run on the host: a graph would freeze them.
            self._recording.refuse("moe_experts chooses its experts on the host")
        return super().moe_experts(x, w13, w2, topk_weights, topk_ids, activation, out)

    # ------------------------------------------------------------------------------------------
    # linear layers
    # ------------------------------------------------------------------------------------------

    def prepare_linear(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        scheme: QuantScheme = QuantScheme.NONE,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        group_size: int = 0,
    ) -> LinearWeight:
        lw = super().prepare_linear(weight, bias, scheme, scales, zeros, group_size)
        if scheme is QuantScheme.NONE:
            if self.nz_weights:
                # torch-npu keeps the logical (N, K) shape of an NZ tensor and converts it back
                # to ND when it is copied to the host, so the documented field stays readable.
                lw.weight = self.npu.npu_format_cast(weight.contiguous(), ACL_FORMAT_FRACTAL_NZ)
                lw.packed = lw.weight
            return lw
        assert scales is not None, "TorchBackend.prepare_linear checks the scales"
        k = lw.in_features
        group = 0 if not group_size or group_size == k else group_size
        if group and (group % QUANT_GROUP_ALIGN or group >= k):
            self._unfused(
                "linear",
                f"quantization group {group} (the NPU takes multiples of "
                f"{QUANT_GROUP_ALIGN} below K={k})",
            )
            return lw
        if scheme is QuantScheme.W8A8:
            lw.packed = QuantizedWeight(weight.T, scales.reshape(-1).float(), None, 0, bias)
        elif scheme is QuantScheme.W8A16:
            offsets = None if zeros is None else -zeros.T
            lw.packed = QuantizedWeight(weight.T, scales.T, offsets, group, bias)
        elif scheme is QuantScheme.W4A16:
            if k % 8:
                self._unfused("linear", f"W4A16 with K={k} (int4 packing needs K % 8 == 0)")
                return lw
            # Our nibbles are unsigned (0..15); the NPU's int4 is signed: store q - 8 and fold
            # the 8 into the offset, (q - 8 + (8 - zeros)) * scales == (q - zeros) * scales.
            lo, hi = (weight & 0x0F).to(torch.int32), (weight >> 4).to(torch.int32)
            q = torch.stack((lo, hi), dim=-1).reshape(lw.out_features, k) - 8  # (N, K)
            packed = self.npu.npu_convert_weight_to_int4pack(q.contiguous())  # (N, K // 8)
            z = torch.zeros_like(scales) if zeros is None else zeros
            lw.packed = QuantizedWeight(packed.T, scales.T, (8 - z).T, group, bias)
        return lw

    def linear(self, x: torch.Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        pack = weight.packed
        if weight.scheme is QuantScheme.NONE:
            w = weight.weight
            if w.dtype != x.dtype:
                return super().linear(x, weight, out)
            return _into(out, F.linear(x, w, weight.bias))
        if not isinstance(pack, QuantizedWeight) or x.dtype not in HALF_DTYPES:
            if x.dtype not in HALF_DTYPES:
                self._unfused("linear", f"quantized linear with {x.dtype} activations")
            return super().linear(x, weight, out)
        if weight.scheme is QuantScheme.W8A8:
            xq, x_scale = self.npu.npu_dynamic_quant(x)  # (T, K) int8, (T,) fp32
            y = self.npu.npu_quant_matmul(
                xq, pack.weight, pack.scales, pertoken_scale=x_scale, output_dtype=x.dtype
            )
            if pack.bias is not None:
                y = y + pack.cast("bias", x.dtype)
            return _into(out, y)
        # The matmul's bias is fp32 for bf16 activations and fp16 for fp16 ones.
        bias_dtype = torch.float32 if x.dtype == torch.bfloat16 else x.dtype
        y = self.npu.npu_weight_quant_batchmatmul(
            x,
            pack.weight,
            pack.cast("scales", x.dtype),
            pack.cast("offsets", x.dtype),
            bias=pack.cast("bias", bias_dtype),
            antiquant_group_size=pack.group_size,
        )
        return _into(out, y)

    # ------------------------------------------------------------------------------------------
    # normalization and activations
    # ------------------------------------------------------------------------------------------

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        if x.dtype not in NORM_DTYPES:
            return super().rms_norm(x, weight, eps, residual, out)
        gamma = weight if weight.dtype == x.dtype else weight.to(x.dtype)
        if residual is None:
            y, _rstd = self.npu.npu_rms_norm(x, gamma, epsilon=eps)
            return _into(out, y), None
        y, _rstd, s = self.npu.npu_add_rms_norm(x, residual, gamma, epsilon=eps)  # y, rstd, x1+x2
        return _into(out, y), s

    def silu_and_mul(self, x: torch.Tensor, out: Tensor | None = None) -> Tensor:
        if x.dtype not in NORM_DTYPES:
            return super().silu_and_mul(x, out)
        return _into(out, self.npu.npu_swiglu(x, dim=-1))  # silu(first half) * second half

    # ------------------------------------------------------------------------------------------
    # attention
    # ------------------------------------------------------------------------------------------

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        head_size: int,
        is_neox_style: bool,
    ) -> tuple[Tensor, Tensor]:
        if q.dtype not in NORM_DTYPES:
            return super().rotary_embedding(
                positions, q, k, cos_sin_cache, head_size, is_neox_style
            )
        t, rot = q.shape[0], cos_sin_cache.shape[-1]
        cos_table, sin_table = self._rope_tables(cos_sin_cache, is_neox_style)
        idx = positions.long()
        cos, sin = cos_table.index_select(0, idx), sin_table.index_select(0, idx)  # (T, R) fp32
        q_heads = q.view(t, -1, head_size)  # (T, Hq, D), a view of q
        k_heads = k.view(t, -1, head_size)  # (T, Hkv, D)
        # Both operators compute in fp32 here, so the result is rounded once, as the HAL asks.
        if is_neox_style and rot == head_size and head_size in FUSED_ROPE_HEAD_SIZES:
            q_out, k_out = self.npu.npu_apply_rotary_pos_emb(
                q_heads.to(torch.float32).contiguous(),
                k_heads.to(torch.float32).contiguous(),
                cos.view(t, 1, rot),
                sin.view(t, 1, rot),
                layout="TND",
                rotary_mode="half",
            )
            q_heads.copy_(q_out)
            k_heads.copy_(k_out)
            return q, k
        mode = "half" if is_neox_style else "interleave"
        for heads in (q_heads, k_heads):
            part = heads[..., :rot].to(torch.float32).contiguous().unsqueeze(0)  # (1, T, H, R)
            rotated = self.npu.npu_rotary_mul(
                part, cos.view(1, t, 1, rot), sin.view(1, t, 1, rot), rotary_mode=mode
            )
            heads[..., :rot].copy_(rotated[0])
        return q, k

    def _rope_tables(
        self, cos_sin_cache: torch.Tensor, neox: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(max_position, R) fp32 multipliers of the form npu_rotary_mul takes: ``[cos, cos]``
        for the neox ("half") pairing, each cos repeated twice for the GPT-J ("interleave")
        one. Built once per cache."""
        key = (id(cos_sin_cache), neox)
        entry = self._rope.get(key)
        if entry is None or entry[0] is not cos_sin_cache:
            half = cos_sin_cache.shape[-1] // 2
            c = cos_sin_cache[:, :half].to(torch.float32)
            s = cos_sin_cache[:, half:].to(torch.float32)
            if neox:
                cos, sin = torch.cat((c, c), dim=-1), torch.cat((s, s), dim=-1)
            else:
                cos, sin = c.repeat_interleave(2, dim=-1), s.repeat_interleave(2, dim=-1)
            entry = (cos_sin_cache, cos.contiguous(), sin.contiguous())
            self._rope[key] = entry
        return entry[1], entry[2]

    def reshape_and_cache(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        hkv, d = key_cache.shape[2], key_cache.shape[3]
        t = key.shape[0]
        k, v = key.view(t, hkv, d), value.view(t, hkv, d)  # (T, Hkv, D)
        recording = self._recording
        full = self._scratch_allocations(key_cache, value_cache) if recording else None
        if recording is not None and full is not None:
            # A recorded step keeps every row: padding rows write to the scratch blocks.
            scratch_start = key_cache.shape[0] * key_cache.shape[1]
            slots = recording.slots(meta, scratch_start)
            key_cache, value_cache = full
        else:
            if recording is not None:
                recording.refuse("a KV cache not from allocate_kv_cache: no scratch blocks")
            rows, slots = self._slots(meta)
            if slots.numel() == 0:
                return
            if rows is not None:  # padding tokens (slot -1) are dropped: the op takes no -1
                k, v = k.index_select(0, rows), v.index_select(0, rows)
        # The scatter takes contiguous inputs of the cache's dtype.
        k = k.to(key_cache.dtype).contiguous()
        v = v.to(value_cache.dtype).contiguous()
        self.npu.npu_scatter_pa_kv_cache(k, v, key_cache, value_cache, slots, cache_mode="Norm")

    def _scratch_allocations(
        self, key_cache: torch.Tensor, value_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The allocations (with scratch blocks) behind two whole caches from
        allocate_kv_cache; None for anything else (a slice of one included)."""
        found = []
        for cache in (key_cache, value_cache):
            entry = self._kv_allocations.get(cache.data_ptr())
            if entry is None or entry[0]() is None or cache.shape[0] != entry[2]:
                return None
            found.append(entry[1])
        return found[0], found[1]

    def _slots(self, meta: AttentionMetadata) -> tuple[torch.Tensor | None, torch.Tensor]:
        cached = meta.device_cache.get("ascend.slots")
        if cached is None:
            valid = meta.slot_mapping >= 0
            rows = None if valid.all() else torch.from_numpy(np.flatnonzero(valid)).to(self.device)
            slots = torch.from_numpy(meta.slot_mapping[valid]).to(self.device)
            cached = meta.device_cache["ascend.slots"] = (rows, slots)
        return cached

    def _lengths(
        self, meta: AttentionMetadata, updated: tuple[str, ...]
    ) -> tuple[list[int], list[int]]:
        """The host lists of one fused attention call (:func:`graphs.lengths`); a recorded
        step re-issues the arguments named in ``updated`` with each replay's lengths."""
        if self._recording is not None:
            self._recording.attention(meta, updated)
            return graphs.lengths(meta)
        cached = meta.device_cache.get("ascend.lengths")
        if cached is None:
            cached = meta.device_cache["ascend.lengths"] = graphs.lengths(meta)
        return cached

    def _block_table(self, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        """(B, max_blocks) int32 on the device (:func:`graphs.masked_block_table`)."""
        if self._recording is not None:
            return self._recording.block_table(meta, block_size)
        key = f"ascend.block_table.{block_size}"
        table = meta.device_cache.get(key)
        if table is None:
            host = graphs.masked_block_table(meta, block_size)
            table = meta.device_cache[key] = torch.from_numpy(host).to(self.device)
        return table

    def _causal_mask(self) -> torch.Tensor:
        if self._mask is None:
            ones = torch.ones(MASK_SIZE, MASK_SIZE, dtype=torch.bool)
            self._mask = torch.triu(ones, diagonal=1).to(self.device)
        return self._mask

    def _attention_unfused_reason(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        logits_soft_cap: float | None,
        align: int,
    ) -> str:
        block_size, head_size = key_cache.shape[1], key_cache.shape[3]
        if logits_soft_cap:
            return "logit soft-capping (the fused kernel has none)"
        if query.dtype not in HALF_DTYPES or key_cache.dtype != query.dtype:
            return f"{query.dtype} queries with a {key_cache.dtype} cache (fp16/bf16 only)"
        if block_size % align or block_size > MAX_BLOCK_SIZE:
            return (
                f"block_size {block_size} (the paged kernel takes multiples of {align} up to "
                f"{MAX_BLOCK_SIZE}; run with block_size {PREFILL_BLOCK_ALIGN})"
            )
        if head_size % 16:
            return f"head size {head_size} (the fused kernel takes multiples of 16)"
        return ""

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
        why = self._attention_unfused_reason(query, key_cache, logits_soft_cap, PREFILL_BLOCK_ALIGN)
        if why:
            self._unfused("paged_attention_prefill", why)
            return super().paged_attention_prefill(
                query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
            )
        num_blocks, block_size, hkv, d = key_cache.shape
        t = query.shape[0]
        hq = query.shape[1] // d
        # TND: the query rows of all sequences back to back; the kernel reads each sequence's
        # keys through its block table. Query lengths go in cumulatively, key lengths per
        # sequence (the page-attention convention), both as host lists.
        query_ends, kv_lens = self._lengths(meta, graphs.PREFILL_LENGTHS)
        band = {}
        sparse_mode = SPARSE_RIGHT_DOWN_CAUSAL
        if sliding_window:
            sparse_mode = SPARSE_BAND
            band = {"pre_tokens": sliding_window - 1, "next_tokens": 0}
        o, _lse = self.npu.npu_fused_infer_attention_score(
            query.view(t, hq, d).contiguous(),
            key_cache.view(num_blocks, block_size, hkv * d),
            value_cache.view(num_blocks, block_size, hkv * d),
            atten_mask=self._causal_mask(),
            actual_seq_lengths=query_ends,
            actual_seq_lengths_kv=kv_lens,
            block_table=self._block_table(meta, block_size),
            num_heads=hq,
            scale=scale,
            input_layout="TND",
            num_key_value_heads=hkv,
            sparse_mode=sparse_mode,
            block_size=block_size,
            **band,
        )  # (T, Hq, D)
        return _into(out, o.view(t, hq * d))

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
        why = self._attention_unfused_reason(query, key_cache, logits_soft_cap, DECODE_BLOCK_ALIGN)
        if why:
            self._unfused("paged_attention_decode", why)
            return super().paged_attention_decode(
                query, key_cache, value_cache, meta, scale, sliding_window, logits_soft_cap, out
            )
        num_blocks, block_size, hkv, d = key_cache.shape
        b = meta.num_seqs
        hq = query.shape[1] // d
        table = self._block_table(meta, block_size)
        # One query per sequence (BSH with S = 1) takes the kernel's incremental path, which
        # needs no causal mask; a sliding window is a mask over the table's key positions.
        mask = self._window_mask(meta, table.shape[1] * block_size, sliding_window)
        _, kv_lens = self._lengths(meta, graphs.DECODE_LENGTHS)
        o, _lse = self.npu.npu_fused_infer_attention_score(
            query.view(b, 1, hq * d).contiguous(),
            key_cache.view(num_blocks, block_size, hkv * d),
            value_cache.view(num_blocks, block_size, hkv * d),
            atten_mask=mask,
            actual_seq_lengths_kv=kv_lens,
            block_table=table,
            num_heads=hq,
            scale=scale,
            input_layout="BSH",
            num_key_value_heads=hkv,
            block_size=block_size,
        )  # (B, 1, Hq * D)
        return _into(out, o.view(b, hq * d))

    def _window_mask(
        self, meta: AttentionMetadata, kv_span: int, sliding_window: int | None
    ) -> torch.Tensor | None:
        """The sliding window as a mask on the device (:func:`graphs.window_mask`)."""
        if not sliding_window:
            return None
        if self._recording is not None:
            return self._recording.window_mask(meta, kv_span, sliding_window)
        key = f"ascend.window.{kv_span}.{sliding_window}"
        mask = meta.device_cache.get(key)
        if mask is None:
            host = graphs.window_mask(meta, kv_span, sliding_window)
            mask = meta.device_cache[key] = torch.from_numpy(host).to(self.device)
        return mask
