"""The contract every backend implements: device and memory, then the unified operators.

Notation: ``T`` tokens in a step, ``B`` sequences, ``H`` hidden size, ``Hq``/``Hkv`` query and
key-value heads, ``D`` head size, ``V`` vocabulary, ``N``/``K`` a linear layer's output and
input features, ``I`` an MLP's intermediate size. "Float" means one of fp32, fp16 or bf16
(fp64 for the reference); outputs have the dtype of the activation input unless stated.

Tensors are backend-native handles (a torch tensor, a pyopencl array, ...). Core reads only
their ``shape`` and passes them back; it never computes on them. Every operator accepts
inputs whose last dimension is contiguous; ``split`` may return such strided views. An
operator given ``out=`` writes its result there (``out`` may be such a view; nothing outside
it changes) and returns ``out``; without it, it returns a new tensor.

Every operator has a default here that raises :class:`UnsupportedOpError`; ``supports`` is
False for those. ``llm_hal.reference.TorchBackend`` implements all of them in plain PyTorch,
so a torch-device backend subclasses it and accelerates op by op.

Each method's docstring ends with who implements it (docs/hal.md has the same as one table):

- REQUIRED: every backend implements it; the default here raises ``NotImplementedError``.
  ``TorchBackend`` implements all of them for torch devices; a backend whose tensors are not
  torch tensors writes its own.
- INHERITED: an operator. ``TorchBackend`` implements it, so a torch-device backend inherits
  it; a backend that is not a ``TorchBackend`` implements it or inherits this default, which
  raises :class:`UnsupportedOpError`: ``supports`` is False, ``llm-core plugins`` lists it as
  unsupported and the conformance suite reports UNSUPPORTED.
- OPTIONAL: a default that works for every backend; override it to do better.

Errors. An operator raises :class:`UnsupportedOpError` only where ``supports`` answers False
for the op, dtype and shape (the conformance suite fails a claimed case that raises it). Bad
arguments (shapes, sizes, a decode call that is not a decode step) raise ``ValueError``.
Anything else a backend raises is a bug in it, reported with its type and message.

The host side of the contract speaks torch and numpy: ``from_host`` takes a CPU
``torch.Tensor`` or a ``numpy.ndarray``, ``to_host`` returns a CPU ``torch.Tensor``, and the
metadata of attention and sampling ops holds numpy arrays. Every tensor handle has a
``shape`` (a sequence of ints, read by :meth:`Backend.shape`) and a ``dtype`` attribute.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from llm_hal.dtypes import DType
from llm_hal.errors import UnsupportedOpError
from llm_hal.metadata import AttentionMetadata, PenaltyMetadata, SamplingMetadata
from llm_hal.spec import DeviceInfo
from llm_hal.weights import LinearWeight, QuantScheme

Tensor = Any  # a backend-native tensor handle

log = logging.getLogger("llm_hal.backend")


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    total: int  # bytes
    free: int  # bytes


@dataclass(frozen=True, slots=True)
class LogprobsResult:
    """What ``compute_logprobs`` returns; every tensor has ``B`` rows."""

    token_logprobs: Tensor  # (B,) fp32
    token_ranks: Tensor  # (B,) int64, 1 = the most likely token
    top_logprobs: Tensor  # (B, k) fp32, descending
    top_ids: Tensor  # (B, k) int64


class CapturedGraph(abc.ABC):
    """A step recorded by :meth:`Backend.capture_graph`; ``replay()`` runs it again."""

    @abc.abstractmethod
    def replay(self) -> None: ...


#: Every operator of the HAL, in the order of the spec below. ``supports``, the conformance
#: suite and ``llm-core plugins`` iterate over this.
OPS: tuple[str, ...] = (
    "embedding",
    "linear",
    "rms_norm",
    "gemma_rms_norm",
    "layer_norm",
    "rotary_embedding",
    "reshape_and_cache",
    "paged_attention_prefill",
    "paged_attention_decode",
    "silu_and_mul",
    "gelu_and_mul",
    "gelu",
    "add",
    "scale",
    "soft_cap",
    "gather_rows",
    "apply_penalties",
    "apply_token_bans",
    "apply_token_bitmask",
    "sample",
    "compute_logprobs",
    "moe_route",
    "moe_experts",
    "all_reduce",
    "all_gather",
)


class Backend:
    """A device plus the unified operators on it. One instance drives one device.

    A subclass sets ``name`` and ``float_dtypes`` (REQUIRED) and may set the two preferences
    below (OPTIONAL).
    """

    #: REQUIRED. Short name of the backend, as in its ``BackendSpec``: errors and reports use it.
    name: ClassVar[str] = "abstract"
    #: REQUIRED. Floating dtypes the backend computes in (activations, weights, KV cache). The
    #: default, empty, makes ``supports`` False for every dtype. The engine serves a dtype only
    #: if ``supports("linear", dtype)``; the suite certifies fp32, bf16 and fp16 from this set.
    float_dtypes: ClassVar[frozenset[DType]] = frozenset()
    #: OPTIONAL. For ``dtype="auto"``: a checkpoint dtype the backend computes poorly, and the
    #: one it recommends instead (e.g. fp16 -> bf16 on CPUs). An explicit dtype is never
    #: replaced. The suite does not certify a substituted dtype unless asked to.
    auto_dtype_substitutes: ClassVar[dict[DType, DType]] = {}
    #: OPTIONAL. KV-cache block size (tokens) the engine uses unless the user sets one: the size
    #: the backend's attention kernels run best with (a power of two).
    preferred_block_size: ClassVar[int] = 16

    # ------------------------------------------------------------------------------------------
    # device and memory
    # ------------------------------------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        """The device this instance runs on: name, index, memory in bytes, and properties
        (driver, compute capability, ...) that reports and certificates print.

        REQUIRED. Should not raise: the conformance suite records an exception as the device.
        """
        raise NotImplementedError

    def memory_info(self) -> MemoryInfo:
        """Total and free memory of the device, in bytes. The engine sizes the KV cache from
        ``free`` (unless given ``kv_cache_memory``); ``llm-core plugins`` prints both.

        REQUIRED. Raises nothing on a working device.
        """
        raise NotImplementedError

    def synchronize(self) -> None:
        """Block until all queued work on the device has finished (a no-op for a backend that
        runs each call to completion). ``to_host`` synchronizes by itself; this is for
        timing, and for ``_record_or_run`` before it reruns a step that failed to record.

        REQUIRED. Raises the device's error if queued work failed.
        """
        raise NotImplementedError

    def empty(self, shape: Sequence[int], dtype: DType) -> Tensor:
        """Allocate an uninitialized tensor on the device, contiguous. Freed when the handle is
        dropped. The engine allocates fp32 logits with it.

        REQUIRED. Raises :class:`UnsupportedOpError` (op ``"empty"``) for a dtype the backend
        cannot hold.
        """
        raise NotImplementedError

    def from_host(self, data: Any, dtype: DType | None = None) -> Tensor:
        """Copy host data to a new device tensor (never an alias of ``data``), converting to
        ``dtype`` when given, else keeping the host dtype.

        ``data`` is a ``numpy.ndarray`` or a CPU ``torch.Tensor``, nothing else; either may be
        non-contiguous. The engine passes int64 numpy arrays (token ids, positions, row
        indices, banned ids) with ``DType.INT64``, the guided-decoding bitmask (int32) with
        ``DType.INT32``, and CPU torch tensors (weights in any checkpoint dtype, bf16
        included; the fp32 rotary table) with the model's dtype or ``DType.FP32``; the
        conformance suite and :class:`~llm_hal.FallbackBackend` pass what
        ``to_host`` returns. A float conversion rounds to nearest even, bit for bit as torch's
        ``Tensor.to`` (the suite checks it exactly).

        REQUIRED. Raises :class:`UnsupportedOpError` (op ``"from_host"``) for a dtype the
        backend cannot hold, ``ValueError`` for a host dtype with no HAL equivalent.
        """
        raise NotImplementedError

    def to_host(self, tensor: Tensor) -> Any:
        """Copy a device tensor to a new contiguous CPU ``torch.Tensor`` of the same shape and
        dtype (bf16 as ``torch.bfloat16``), never a view of device memory; ``tensor`` may be a
        strided view. Synchronizes as needed.

        Always a torch tensor, whatever the backend's own tensors are: the engine calls
        ``.tolist()`` on it, the suite compares it with torch and checks its type, and
        :class:`~llm_hal.FallbackBackend` hands it to another backend's ``from_host``.

        REQUIRED. Raises nothing for a tensor of this backend.
        """
        raise NotImplementedError

    def copy_(self, dst: Tensor, src: Tensor) -> Tensor:
        """Copy ``src`` into ``dst`` (same shape, dtype converted if they differ, rounding to
        nearest even); returns dst. ``dst`` may be a strided view from ``split``; nothing
        outside it changes. The engine converts logits to fp32 this way, keeps a raw copy of
        logits, and refreshes a recorded step's int64 inputs in place.

        REQUIRED. Raises ``ValueError`` when the shapes differ.
        """
        raise NotImplementedError

    def dtype_of(self, tensor: Tensor) -> DType:
        """The HAL dtype of a device tensor (the engine checks its logits are fp32).

        REQUIRED. Raises ``ValueError`` for a tensor whose dtype has no HAL equivalent.
        """
        raise NotImplementedError

    def reshape(self, tensor: Tensor, shape: Sequence[int]) -> Tensor:
        """A view (or, if the backend cannot view, a copy) with a new shape; ``-1`` infers one
        dimension. The element count is unchanged. ``tensor`` may be a strided view from
        ``split``; callers use only the returned tensor, never rely on it aliasing the input.

        REQUIRED. Raises ``ValueError`` when the element counts differ.
        """
        raise NotImplementedError

    def split(self, tensor: Tensor, sizes: Sequence[int]) -> list[Tensor]:
        """Split the last dimension into consecutive parts of the given sizes (summing to the
        dimension). Parts may be strided views of ``tensor`` (only their last dimension is
        contiguous) or copies: callers never rely on either.

        REQUIRED. Raises ``ValueError`` when the sizes do not sum to the last dimension.
        """
        raise NotImplementedError

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, dtype: DType
    ) -> tuple[Tensor, Tensor]:
        """One layer's paged cache: a key and a value tensor, each logically
        ``(num_blocks, block_size, num_kv_heads, head_size)``, zero-filled.

        The logical layout is what ``reshape_and_cache`` and the attention ops index; a backend
        may store it differently as long as its own ops agree and ``to_host`` returns the
        logical layout. The engine allocates one pair per layer, in the model's dtype.

        REQUIRED. Raises :class:`UnsupportedOpError` for a cache dtype the backend cannot hold.
        """
        raise NotImplementedError

    def prepare_linear(
        self,
        weight: Tensor,
        bias: Tensor | None = None,
        scheme: QuantScheme = QuantScheme.NONE,
        scales: Tensor | None = None,
        zeros: Tensor | None = None,
        group_size: int = 0,
    ) -> LinearWeight:
        """Turn a weight in the documented layout of ``scheme`` (see :class:`QuantScheme`) into a
        :class:`LinearWeight`, done once at load time. ``weight`` is ``(N, K)`` (``(N, K/2)``
        for W4A16), ``bias`` ``(N,)``. A backend may repack into a private layout, kept in
        ``LinearWeight.packed``: ``weight`` and the other fields keep the documented form (the
        engine reads a tied LM head's ``weight`` as the ``(V, H)`` embedding table, and
        per-op fallback and the suite read the documented fields).

        OPTIONAL: this default keeps a dense weight as it is. Raises
        :class:`UnsupportedOpError` (op ``"linear"``) for a quantized scheme the backend does
        not implement (``supports("linear", scheme=...)`` must then be False), ``ValueError``
        for a quantized weight without scales or ``K`` not a multiple of ``group_size``
        (``TorchBackend``, which implements every scheme).
        """
        if scheme is not QuantScheme.NONE:
            raise UnsupportedOpError(self.name, "linear", f"quantization {scheme.value}")
        n, k = self.shape(weight)
        return LinearWeight(weight=weight, bias=bias, scheme=scheme, out_features=n, in_features=k)

    @staticmethod
    def shape(tensor: Tensor) -> tuple[int, ...]:
        """The shape of a tensor handle, from its ``shape`` attribute.

        Not overridden: every backend's tensors have ``shape``. Core calls it; it raises
        nothing for a tensor.
        """
        return tuple(int(s) for s in tensor.shape)

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        """OPTIONAL (HAL 1.1). Call ``fn()`` once while recording the operators it runs, and
        return a graph whose ``replay()`` runs them again with no host code in between (CUDA
        graphs; a native list of kernel calls on CPU): the decode step as one call.

        ``fn`` runs eagerly at least once; a backend may call it again while recording (a
        CUDA graph records what a second call launches), so it must be safe to repeat: the
        same step on the same inputs. When this returns, whatever it returns, the results of
        the last call are valid, and they are what ``replay()`` rewrites. Returns None when
        the backend does not capture (this default) or when ``fn`` ran something it cannot
        record (the reason is logged).

        ``replay()`` reads the current contents of the tensors ``fn`` used and of the host
        metadata objects (:class:`AttentionMetadata` ...) it passed, and rewrites the same
        output tensors. The caller keeps those objects alive and updates them in place between
        replays: same shapes and number of sequences, new values (token ids, positions, slots,
        block tables, sequence lengths). Host code inside ``fn`` does not run again, except
        where a backend emulates a graph by calling ``fn`` again (a test device without
        graphs): ``fn`` then stores its results where the caller reads them.

        Never raises for a failure to record (see :meth:`_record_or_run`); an exception of
        ``fn`` itself propagates. The engine captures decode steps unless
        ``LLM_CORE_ENFORCE_EAGER=1``.
        """
        fn()
        return None

    def _record_or_run(
        self, fn: Callable[[], object], record: Callable[[], CapturedGraph | None], what: str
    ) -> CapturedGraph | None:
        """For ``capture_graph`` implementations: ``record()``, and if that fails in any way,
        log why (``what``: the kind of graph), wait for the device and run ``fn`` eagerly, so
        its results are valid as the contract asks and the step simply stays eager."""
        try:
            return record()
        except Exception as exc:  # any failure to record means: run eagerly
            log.warning("%s: the decode step is not recorded as %s: %s", self.name, what, exc)
            self.synchronize()
            fn()
            return None

    # ------------------------------------------------------------------------------------------
    # capability
    # ------------------------------------------------------------------------------------------

    def supports(self, op: str, dtype: DType | None = None, **shape: int) -> bool:
        """Can this backend run ``op`` for activations of ``dtype`` and the given shape
        parameters? The default: the op is implemented and the dtype is one of
        ``float_dtypes``. Override to refine by shape, and keep it cheap.

        The shape parameters callers pass today: ``head_size`` and ``block_size`` for the
        attention ops and ``reshape_and_cache``, ``scheme`` (a :class:`QuantScheme` value
        such as ``"w8a16"``) for ``linear``; ignore any other. The engine asks
        ``supports("linear", dtype)`` to decide whether the backend computes in ``dtype`` at
        all; the conformance suite asks for every case, then checks the answer (a declared
        case must run, an undeclared one must raise :class:`UnsupportedOpError`).

        OPTIONAL to override. Raises ``ValueError`` for a name not in :data:`OPS`.
        """
        if op not in OPS:
            raise ValueError(f"unknown operator {op!r}; the HAL operators are: {', '.join(OPS)}")
        implemented = getattr(type(self), op) is not getattr(Backend, op)
        return implemented and (dtype is None or dtype in self.float_dtypes)

    def native_ops(self) -> frozenset[str]:
        """Operators this backend implements itself rather than inheriting from the reference
        (``TorchBackend`` leaves out its own). ``llm-core plugins`` shows them as native.

        Not overridden by backends. Raises nothing.
        """
        own = set()
        for op in OPS:
            if getattr(type(self), op) is not getattr(Backend, op):
                own.add(op)
        return frozenset(own)

    def _unsupported(self, op: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.name, op)

    # ------------------------------------------------------------------------------------------
    # embedding and linear layers
    # ------------------------------------------------------------------------------------------

    def embedding(self, ids: Tensor, table: Tensor, out: Tensor | None = None) -> Tensor:
        """Gather rows of an embedding table.

        ids: (T,) int32 or int64, each in ``[0, V)``. table: (V, H) float.
        Returns (T, H) with the table's dtype: ``out[t] = table[ids[t]]`` exactly.

        INHERITED.
        """
        raise self._unsupported("embedding")

    def linear(self, x: Tensor, weight: LinearWeight, out: Tensor | None = None) -> Tensor:
        """``y = x @ W.T + bias`` for a weight prepared by :meth:`prepare_linear`.

        x: (T, K) float. Returns (T, N) in x's dtype. Accumulation is at least fp32. For
        quantized schemes ``W`` is the dequantized weight defined in :class:`QuantScheme`
        (W8A8 quantizes ``x`` as defined there).

        INHERITED. A scheme the backend lacks is refused at load time by ``prepare_linear``.
        """
        raise self._unsupported("linear")

    # ------------------------------------------------------------------------------------------
    # normalization
    # ------------------------------------------------------------------------------------------

    def rms_norm(
        self,
        x: Tensor,
        weight: Tensor,
        eps: float,
        residual: Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Root-mean-square norm over the last dimension, optionally fused with a residual add.

        x: (T, H) float; weight: (H,). Without ``residual``: returns ``(y, None)`` with
        ``y = x / sqrt(mean(x**2) + eps) * weight``. With ``residual`` (T, H): ``s = x +
        residual`` is formed in x's dtype (rounded) and returned as the new residual, and
        ``y = rms_norm(s)``: returns ``(y, s)``. The norm is computed in at least fp32 and
        rounded to x's dtype before multiplying by ``weight`` (the Llama convention). A backend
        may write ``s`` into ``residual``'s storage. Also used for per-head q/k norms with
        x reshaped to (T * heads, D). Never writes ``x``.

        INHERITED.
        """
        raise self._unsupported("rms_norm")

    def gemma_rms_norm(
        self,
        x: Tensor,
        weight: Tensor,
        eps: float,
        residual: Tensor | None = None,
        out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`rms_norm` in the Gemma convention (Gemma 2 and 3; transformers'
        ``Gemma2RMSNorm``, ``Gemma3RMSNorm``): the weight is an offset from one, and the result
        is rounded once.

        x: (T, H) float; weight: (H,) float, any of the float dtypes (usually x's). Without
        ``residual``: returns ``(y, None)`` with ``y = (x_f32 * rsqrt(mean(x_f32**2) + eps)) *
        (1 + weight_f32)``, computed entirely in at least fp32 and rounded once to x's dtype
        (``rms_norm`` rounds the normalized value before multiplying by the weight; this does
        not). With ``residual`` (T, H): exactly as :meth:`rms_norm`, ``s = x + residual`` is
        formed in x's dtype (rounded) and returned as the new residual, and ``y =
        gemma_rms_norm(s)``: returns ``(y, s)``. A backend may write ``s`` into ``residual``'s
        storage. Also used for per-head q/k norms with x reshaped to (T * heads, D). Never
        writes ``x``. HAL 1.3.

        INHERITED.
        """
        raise self._unsupported("gemma_rms_norm")

    def layer_norm(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, out: Tensor | None = None
    ) -> Tensor:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dimension, biased
        variance, computed in at least fp32. x: (T, H) float; weight, bias: (H,); ``bias`` may
        be None.

        INHERITED.
        """
        raise self._unsupported("layer_norm")

    # ------------------------------------------------------------------------------------------
    # attention
    # ------------------------------------------------------------------------------------------

    def rotary_embedding(
        self,
        positions: Tensor,
        q: Tensor,
        k: Tensor,
        cos_sin_cache: Tensor,
        head_size: int,
        is_neox_style: bool,
    ) -> tuple[Tensor, Tensor]:
        """Rotate q and k in place by their positions; returns ``(q, k)``.

        positions: (T,) int64. q: (T, Hq * D); k: (T, Hkv * D), float, may be strided views.
        cos_sin_cache: (max_position, R) fp32 with ``R = rotary_dim``, ``cos`` in the first
        ``R/2`` columns and ``sin`` in the last ``R/2`` (rope scaling is baked into it). Only the
        first ``R`` of each head's ``D`` features rotate; the rest pass through.
        Neox style pairs feature ``i`` with ``i + R/2``; GPT-J style pairs ``2i`` with ``2i+1``.
        For a pair ``(a, b)`` and angle index ``i``: ``a' = a*cos_i - b*sin_i``,
        ``b' = b*cos_i + a*sin_i``. Computed in fp32, rounded once to q's dtype. Nothing
        outside the rotated features of q and k changes (v, beside them in a fused buffer,
        included).

        INHERITED.
        """
        raise self._unsupported("rotary_embedding")

    def reshape_and_cache(
        self,
        key: Tensor,
        value: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Write the step's new keys and values into the paged cache.

        key, value: (T, Hkv * D), may be strided views. Caches as from
        :meth:`allocate_kv_cache`. Token ``t`` goes to slot ``meta.slot_mapping[t]`` (skipped
        when -1), converted to the cache's dtype. Nothing else in the cache changes.

        INHERITED. In place; returns None.
        """
        raise self._unsupported("reshape_and_cache")

    def paged_attention_prefill(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Causal attention of the step's new tokens over their sequences' cached context.

        query: (T, Hq * D) float, may be a strided view; ``Hq`` is a multiple of ``Hkv`` (GQA:
        query head ``h`` reads KV head ``h // (Hq / Hkv)``). Keys and values, the new ones
        included, are read from the caches (call :meth:`reshape_and_cache` first). Any mix of
        query lengths per sequence, a prefix already cached or not (chunked prefill, prefix
        caching). Scores ``= scale * q.k``; with ``logits_soft_cap`` c, ``c * tanh(score / c)``;
        with ``sliding_window`` w, query position p sees keys at positions ``> p - w``.
        Softmax in fp32. Returns (T, Hq * D) in query's dtype. Never writes query or the
        caches. ``meta.block_tables`` entries past a sequence's need hold any value: never
        read them.

        INHERITED.
        """
        raise self._unsupported("paged_attention_prefill")

    def paged_attention_decode(
        self,
        query: Tensor,
        key_cache: Tensor,
        value_cache: Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """:meth:`paged_attention_prefill` for the case ``meta.is_decode`` (one new token per
        sequence, ``T == B``): the path for long-context, memory-bound decoding.

        INHERITED. Raises ``ValueError`` unless ``meta.is_decode`` (check it with
        ``meta.require_decode()``, cached per step).
        """
        raise self._unsupported("paged_attention_decode")

    # ------------------------------------------------------------------------------------------
    # activations and elementwise
    # ------------------------------------------------------------------------------------------

    def silu_and_mul(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x: (T, 2I) = [gate | up]. Returns ``silu(gate) * up``: (T, I), computed in fp32.

        INHERITED.
        """
        raise self._unsupported("silu_and_mul")

    def gelu_and_mul(
        self, x: Tensor, approximate: str = "none", out: Tensor | None = None
    ) -> Tensor:
        """x: (T, 2I) = [gate | up]. Returns ``gelu(gate) * up``: (T, I). ``approximate`` is
        ``"none"`` (erf) or ``"tanh"``, computed in fp32.

        INHERITED.
        """
        raise self._unsupported("gelu_and_mul")

    def gelu(self, x: Tensor, approximate: str = "none", out: Tensor | None = None) -> Tensor:
        """Elementwise gelu, ``approximate`` ``"none"`` (erf) or ``"tanh"``, computed in fp32.

        INHERITED.
        """
        raise self._unsupported("gelu")

    def add(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        """Elementwise ``a + b``, same shapes and dtypes; computed in at least fp32 and rounded
        once to the dtype.

        INHERITED.
        """
        raise self._unsupported("add")

    def scale(self, x: Tensor, factor: float, out: Tensor | None = None) -> Tensor:
        """Elementwise ``x * factor``: Gemma's scaled embeddings (``factor = sqrt(H)``).

        x: (T, H) float. ``factor`` (a Python float) is first rounded to x's dtype, as
        transformers does with ``embed_scale.to(weight.dtype)``; the product is computed in at
        least fp32 and rounded once to x's dtype. For fp32, bf16 and fp16 that product is
        exact in fp32, so the result is bit for bit transformers' ``x * normalizer`` in x's
        dtype. HAL 1.3.

        INHERITED.
        """
        raise self._unsupported("scale")

    def soft_cap(self, x: Tensor, cap: float, out: Tensor | None = None) -> Tensor:
        """Elementwise ``cap * tanh(x / cap)``: the final-logit soft cap of Gemma 2.

        x: (B, V) float (fp32 logits where the engine calls it). Computed in at least fp32 and
        rounded once to x's dtype; saturates to ``+-cap`` for large ``|x|`` (``+-inf`` gives
        ``+-cap``, NaN stays NaN). HAL 1.3.

        INHERITED. Raises ``ValueError`` unless ``cap > 0``.
        """
        raise self._unsupported("soft_cap")

    def gather_rows(self, x: Tensor, indices: Tensor, out: Tensor | None = None) -> Tensor:
        """x: (T, H); indices: (B,) int64 in ``[0, T)``. Returns (B, H), ``out[b] = x[indices[b]]``
        exactly: picks the rows whose logits are needed (x is fp32 logits, or (T, H)
        activations before the LM head).

        INHERITED.
        """
        raise self._unsupported("gather_rows")

    # ------------------------------------------------------------------------------------------
    # logits processing and sampling
    # ------------------------------------------------------------------------------------------

    def apply_penalties(self, logits: Tensor, meta: PenaltyMetadata) -> Tensor:
        """Apply repetition, frequency and presence penalties (see :class:`PenaltyMetadata`) to
        fp32 logits (B, V) in place; returns logits.

        INHERITED. Called with fp32 logits only, whatever the model's dtype; the suite checks
        the four logits operators in fp32.
        """
        raise self._unsupported("apply_penalties")

    def apply_token_bans(self, logits: Tensor, banned: Tensor) -> Tensor:
        """Set ``logits[b, banned[b, j]] = -inf`` for every ``banned[b, j] >= 0``, in place.
        banned: (B, L) int64 padded with -1 (e.g. EOS before ``min_tokens``).

        INHERITED. fp32 logits only.
        """
        raise self._unsupported("apply_token_bans")

    def apply_token_bitmask(self, logits: Tensor, bitmask: Tensor) -> Tensor:
        """Set ``logits[b, t] = -inf`` for every token ``t`` whose bit is clear, in place:
        bit ``t % 32`` of ``bitmask[b, t // 32]`` (int32, two's complement; -1 = all allowed).
        bitmask: (B, ceil(V / 32)) int32; bits past V are ignored. This is how guided decoding
        (JSON schema, regex, grammar) restricts a row to the tokens its grammar accepts; rows
        without a grammar are all ones. HAL 1.2.

        INHERITED. fp32 logits only.
        """
        raise self._unsupported("apply_token_bitmask")

    def sample(self, logits: Tensor, meta: SamplingMetadata) -> Tensor:
        """Draw one token id per row of fp32 logits (B, V); returns (B,) int64.

        Greedy rows (temperature 0) take the argmax. Other rows: divide by temperature, keep the
        ``top_k`` largest, then the smallest set of most likely tokens whose probability sums to
        at least ``top_p``, then drop tokens with probability below ``min_p`` times the largest;
        renormalize and draw from what remains, using only ``meta.seeds[b]`` as randomness.
        The same seed and logits give the same token on the same backend. Does not modify
        logits.

        INHERITED. fp32 logits only.
        """
        raise self._unsupported("sample")

    def compute_logprobs(self, logits: Tensor, token_ids: Tensor, num_top: int) -> LogprobsResult:
        """Log-softmax of fp32 logits (B, V) in fp32: the log-probability and rank of
        ``token_ids`` (B,) int64, and the ``num_top`` (>= 0) most likely tokens per row
        (ties: lower id first).

        INHERITED. fp32 logits only.
        """
        raise self._unsupported("compute_logprobs")

    # ------------------------------------------------------------------------------------------
    # mixture of experts
    # ------------------------------------------------------------------------------------------

    def moe_route(
        self, router_logits: Tensor, top_k: int, renormalize: bool
    ) -> tuple[Tensor, Tensor]:
        """Softmax over experts in fp32 (router_logits: (T, E)), then the ``top_k`` experts per
        token. Returns ``(weights (T, top_k) fp32, ids (T, top_k) int64)``, weights descending;
        with ``renormalize`` the weights of each token sum to 1.

        INHERITED.
        """
        raise self._unsupported("moe_route")

    def moe_experts(
        self,
        x: Tensor,
        w13: Tensor,
        w2: Tensor,
        topk_weights: Tensor,
        topk_ids: Tensor,
        activation: str = "silu",
        out: Tensor | None = None,
    ) -> Tensor:
        """Gated-MLP experts. x: (T, H); w13: (E, 2I, H) = [gate; up] per expert; w2: (E, H, I).
        ``out[t] = sum_j topk_weights[t, j] * w2[e] @ act_and_mul(w13[e] @ x[t])`` with
        ``e = topk_ids[t, j]``; ``activation`` is ``"silu"`` or ``"gelu"``. Returns (T, H).

        INHERITED. Raises :class:`UnsupportedOpError` for another ``activation``.
        """
        raise self._unsupported("moe_experts")

    # ------------------------------------------------------------------------------------------
    # collectives (tensor parallelism)
    # ------------------------------------------------------------------------------------------

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` over the ranks of the tensor-parallel group, in place; returns x. With no
        process group (a single process) this is the identity.

        INHERITED. ``TorchBackend`` reduces over the ``torch.distributed`` group given to its
        ``set_tensor_parallel_group``.
        """
        raise self._unsupported("all_reduce")

    def all_gather(self, x: Tensor) -> Tensor:
        """Concatenate ``x`` (T, n) from every rank along the last dimension in rank order:
        returns (T, n * world_size). Identity for a single process.

        INHERITED, as ``all_reduce``.
        """
        raise self._unsupported("all_gather")
