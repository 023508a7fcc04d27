"""Graph mode on Ascend: the engine's decode step recorded as one torch-npu ``NPUGraph``.

A decode step launches a few hundred small operators; recorded once, a replay costs one graph
launch plus a few small uploads and one attention update per layer instead of every operator's
host-side dispatch. torch-npu 2.13.0 offers graphs with CUDA's
shape (``torch.npu.NPUGraph``, ``torch.npu.graph(...)``, ``torch.npu.graph_pool_handle()``)
and one difference that matters here: ``npu_fused_infer_attention_score`` takes the sequence
lengths as host integer lists, which a recording freezes. torch-npu's answer is
``auto_dispatch_capture=True``: the attention calls are then recorded as updatable task
groups, and ``NPUGraph.update(cpu_update_input=[{...}, ...])`` (one dict per recorded call, in
order) re-issues each with new ``actual_seq_lengths`` / ``actual_seq_lengths_kv`` before
``replay()``.

Everything else a step reads must sit at fixed addresses, so while recording the backend asks
this module for static device copies of each :class:`AttentionMetadata` it sees (block table,
KV-cache slots, sliding-window mask) instead of uploading new ones, and ``replay()`` refills
them from the metadata's host arrays, which the engine updates in place between replays.

Padding rows (a batch smaller than the recorded size) have slot -1, which
``npu_scatter_pa_kv_cache`` does not take, and a recorded step cannot drop rows as the eager
path does. So :meth:`AscendBackend.allocate_kv_cache` keeps a few scratch blocks past the ones
it hands out, and in a recorded step padding row ``i`` writes to scratch slot ``i``: distinct
slots no sequence ever reads.

The recording runs ``fn`` twice: once eagerly (it creates the static copies, the rotary
tables and the causal mask, which must not be allocated and uploaded during capture), then
inside the capture. A step that reads the metadata through an unfused path (fp32 attention,
say: host code a graph would freeze) or picks MoE experts on the host is not recorded, and a
capture that fails for any reason leaves the step eager: ``capture_graph`` returns None, the
reason is logged, and ``fn``'s results are valid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from llm_hal import AttentionMetadata
from llm_hal.backend import CapturedGraph

if TYPE_CHECKING:
    from llm_core_ascend.backend import AscendBackend

log = logging.getLogger(__name__)

#: Tokens of scratch space past each KV cache, for the padding rows of recorded steps: more
#: than the largest padding a capture size leaves.
SCRATCH_TOKENS = 256

#: The arguments of npu_fused_infer_attention_score that NPUGraph.update re-issues (torch-npu's
#: graph handler for the operator; tests/test_ascend_graphs.py reads them out of the wheel).
PREFILL_LENGTHS = ("actual_seq_lengths", "actual_seq_lengths_kv")
DECODE_LENGTHS = ("actual_seq_lengths_kv",)


def padded_slots(slot_mapping: np.ndarray, scratch_start: int) -> np.ndarray:
    """``slot_mapping`` with every -1 (a padding token) replaced by its own scratch slot:
    the ``i``-th padding token goes to ``scratch_start + i``."""
    slots = slot_mapping.astype(np.int64, copy=True)
    pad = slots < 0
    count = int(pad.sum())
    if count > SCRATCH_TOKENS:
        raise ValueError(
            f"{count} padding tokens in a recorded step; the scratch space holds {SCRATCH_TOKENS}"
        )
    slots[pad] = scratch_start + np.arange(count)
    return slots


def masked_block_table(meta: AttentionMetadata, block_size: int) -> np.ndarray:
    """The block table with entries past each sequence's blocks set to 0 (the kernel reads
    block ids only below ``seq_len``, but never sees whatever the engine left there)."""
    host = meta.block_tables.copy()
    needed = -(-meta.seq_lens.astype(np.int64) // block_size)  # (B,)
    host[np.arange(host.shape[1])[None, :] >= needed[:, None]] = 0
    return host


def window_mask(meta: AttentionMetadata, kv_span: int, window: int) -> np.ndarray:
    """(B, 1, 1, kv_span) bool, True (masked) for keys that left the window: the decode query
    at position ``seq_len - 1`` sees keys at positions ``> seq_len - 1 - window``."""
    first = meta.seq_lens.astype(np.int64)[:, None] - window  # (B, 1)
    return (np.arange(kv_span)[None, :] < first)[:, None, None, :]


def lengths(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    """The host lists the fused attention takes: the cumulative query counts
    (``query_start_loc[1:]``) and each sequence's key count (``seq_lens``)."""
    return meta.query_start_loc[1:].tolist(), meta.seq_lens.tolist()


@dataclass(slots=True)
class _Static:
    """One device tensor a recorded step reads, and how to refill it from its metadata."""

    tensor: torch.Tensor
    fill: Callable[[AttentionMetadata], np.ndarray]

    def refill(self, meta: AttentionMetadata) -> None:
        self.tensor.copy_(torch.from_numpy(np.ascontiguousarray(self.fill(meta))))


@dataclass(slots=True)
class _MetaStatics:
    """The static device copies of one metadata object, keyed by what they hold."""

    meta: AttentionMetadata
    shapes: tuple[tuple[int, ...], ...]
    tensors: dict[tuple[Any, ...], _Static] = field(default_factory=dict)


def _shapes(meta: AttentionMetadata) -> tuple[tuple[int, ...], ...]:
    return (meta.seq_lens.shape, meta.block_tables.shape, meta.slot_mapping.shape)


class Recorder:
    """What the backend consults while ``capture_graph`` runs the step (``backend._recording``).

    In the eager pass it makes the static copies; in the capture pass it hands out the same
    ones and notes each fused attention call (the order of torch-npu's update records).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.capturing = False
        self.refused: str | None = None
        self.statics: dict[int, _MetaStatics] = {}
        self.attention_calls: list[tuple[AttentionMetadata, tuple[str, ...]]] = []

    def refuse(self, reason: str) -> None:
        """The step ran something a graph would freeze: it will not be recorded."""
        if self.refused is None:
            self.refused = reason

    def _static(
        self, meta: AttentionMetadata, key: tuple[Any, ...], fill: Callable[..., np.ndarray]
    ) -> torch.Tensor:
        entry = self.statics.get(id(meta))
        if entry is None or entry.meta is not meta:
            entry = self.statics[id(meta)] = _MetaStatics(meta, _shapes(meta))
        static = entry.tensors.get(key)
        if static is None:
            if self.capturing:  # an upload now would be recorded reading host memory
                raise RuntimeError(
                    f"the step asked for new device metadata {key[0]!r} while being captured "
                    "(the eager pass did not): a step must run the same operators every time"
                )
            host = np.ascontiguousarray(fill(meta))
            static = _Static(torch.from_numpy(host).to(self.device, copy=True), fill)
            entry.tensors[key] = static
        return static.tensor

    def slots(self, meta: AttentionMetadata, scratch_start: int) -> torch.Tensor:
        return self._static(
            meta, ("slots", scratch_start), lambda m: padded_slots(m.slot_mapping, scratch_start)
        )

    def block_table(self, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
        return self._static(
            meta, ("block_table", block_size), lambda m: masked_block_table(m, block_size)
        )

    def window_mask(self, meta: AttentionMetadata, kv_span: int, window: int) -> torch.Tensor:
        return self._static(
            meta, ("window", kv_span, window), lambda m: window_mask(m, kv_span, window)
        )

    def attention(self, meta: AttentionMetadata, updated: tuple[str, ...]) -> None:
        """A fused attention call with host lengths: replay updates ``updated`` in it."""
        if self.capturing:
            self.attention_calls.append((meta, updated))


class AscendStepGraph(CapturedGraph):
    """``Backend.capture_graph`` on Ascend: ``fn`` recorded as one NPU graph.

    ``runtime`` is the namespace with torch-npu's graph API (``torch.npu``; the tests hand in
    an emulation with the same signatures, tests/support/ascend_graph_emulation.py).
    """

    def __init__(self, graph: Any, recorder: Recorder):
        self._graph = graph
        self._recorder = recorder

    @classmethod
    def record(
        cls, backend: AscendBackend, runtime: Any, fn: Callable[[], object], pool: Any
    ) -> AscendStepGraph | None:
        recorder = Recorder(backend.device)
        backend._recording = recorder
        try:
            fn()  # eager: static copies, rotary tables, masks, workspaces made outside capture
            if recorder.refused:
                log.info("ascend: the decode step is not recorded as a graph: %s", recorder.refused)
                return None
            backend.synchronize()
            recorder.capturing = True
            graph = runtime.NPUGraph()
            with runtime.graph(graph, pool=pool, auto_dispatch_capture=True):
                fn()
        finally:
            backend._recording = None
        step = cls(graph, recorder)
        step.replay()  # a capture records without running: the results hold values after this
        return step

    def replay(self) -> None:
        for entry in self._recorder.statics.values():
            if _shapes(entry.meta) != entry.shapes:
                raise ValueError(
                    "the metadata of a recorded step changed shape (sequences or block-table "
                    f"width): {entry.shapes} when recorded, {_shapes(entry.meta)} now; "
                    "record a graph for the new shape"
                )
            for static in entry.tensors.values():
                static.refill(entry.meta)
        calls = self._recorder.attention_calls
        if calls:
            updates = []
            for meta, names in calls:
                query_ends, kv_lens = lengths(meta)
                values = {"actual_seq_lengths": query_ends, "actual_seq_lengths_kv": kv_lens}
                updates.append({name: values[name] for name in names})
            self._graph.update(cpu_update_input=updates)
        self._graph.replay()
