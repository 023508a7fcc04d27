"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step launches a few hundred small kernels; at batch 1 their launch overhead, not
memory bandwidth, would bound the step. A :class:`DecodeGraph` records the whole step once
for ``batch_size`` sequences and replays it with one launch. Everything the step reads lives
in static buffers: the token ids and positions, and the device metadata the attention and
cache kernels read (:class:`AttentionInputs`), which the graph places in its template
metadata's ``device_cache`` so no operator uploads anything while recording. Before each
replay the new step's values are copied into those buffers; rows past the step's batch are
padding (slot -1: nothing is written to the KV cache; context length 1).

Grids and split counts are fixed at recording from the bounds (``batch_size`` sequences,
``max_blocks_per_seq * block_size`` tokens of context), so a short context just leaves most
decode splits empty.

On a device other than CUDA (the interpreter tests), "recording" keeps the step function
and replay calls it again on the same static buffers: the same contract, checked without a
GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from llm_hal import AttentionMetadata
from llm_hal.backend import CapturedGraph

from llm_triton.attention_inputs import AttentionInputs

if TYPE_CHECKING:
    from llm_triton.backend import TritonBackend

_T = TypeVar("_T")

#: ``step(input_ids (B,) int64, positions (B,) int64, meta) -> (B, ...)``: one decode step.
DecodeStep = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]

#: Batch sizes graphs are recorded for; a step runs in the smallest bucket that holds it.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def bucket_for(batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> int | None:
    """The smallest bucket holding ``batch`` sequences, or None if it exceeds them all."""
    return next((b for b in sorted(buckets) if b >= batch), None)


def _capture(
    device: torch.device, fn: Callable[[], _T], pool: Any, warmups: int
) -> tuple[torch.cuda.CUDAGraph, _T]:
    """``fn`` recorded as a CUDA graph on ``device`` (in ``pool``), and what the recorded
    call returned. ``fn`` first runs ``warmups`` times on a side stream: that compiles the
    Triton kernels and creates cuBLAS workspaces, neither of which may happen during capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class DecodeGraph:
    """One decode step recorded for up to ``batch_size`` sequences."""

    def __init__(
        self,
        backend: TritonBackend,
        step: DecodeStep,
        batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        pool: Any = None,
    ):
        if batch_size < 1 or max_blocks_per_seq < 1:
            raise ValueError("a decode graph needs batch_size >= 1 and max_blocks_per_seq >= 1")
        self.batch_size = batch_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self._device = backend.device
        b, m = batch_size, max_blocks_per_seq
        dev = backend.device
        self.input_ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.inputs = AttentionInputs(
            query_start_loc=torch.arange(b + 1, dtype=torch.int32, device=dev),
            seq_lens=torch.ones(b, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((b, m), dtype=torch.int32, device=dev),
            slot_mapping=torch.full((b,), -1, dtype=torch.int64, device=dev),
            max_query_len=1,
            max_seq_len=m * block_size,
        )
        # The template the step sees while recording. Its host arrays describe padding only:
        # an operator that read them instead of the device inputs would replay stale values.
        self.meta = AttentionMetadata(
            query_start_loc=np.arange(b + 1),
            seq_lens=np.ones(b),
            block_tables=np.zeros((b, m)),
            slot_mapping=np.full(b, -1),
            block_size=block_size,
        )
        backend.set_attention_inputs(self.meta, self.inputs)
        pinned = dev.type == "cuda"
        self._host = {
            name: torch.zeros(t.shape, dtype=t.dtype).pin_memory()
            if pinned
            else torch.zeros(t.shape, dtype=t.dtype)
            for name, t in self._static().items()
        }
        self._copied: torch.cuda.Event | None = None
        self._step = step
        self._graph: torch.cuda.CUDAGraph | None = None
        self.output = self._record(step, pool)

    def _static(self) -> dict[str, torch.Tensor]:
        i = self.inputs
        return {
            "input_ids": self.input_ids,
            "positions": self.positions,
            "seq_lens": i.seq_lens,
            "block_tables": i.block_tables,
            "slot_mapping": i.slot_mapping,
        }

    def _record(self, step: DecodeStep, pool: Any) -> torch.Tensor:
        if self._device.type != "cuda":
            return step(self.input_ids, self.positions, self.meta)
        # All slots are -1, so the warm-up runs write nothing to the KV cache.
        self._graph, out = _capture(
            self._device, lambda: step(self.input_ids, self.positions, self.meta), pool, 2
        )
        return out

    def fits(self, meta: AttentionMetadata) -> bool:
        """Can this graph run the step ``meta`` describes (a decode step no larger than it)?"""
        needed = -(-meta.max_seq_len // self.block_size) if meta.num_seqs else 0
        return (
            meta.is_decode
            and meta.num_seqs <= self.batch_size
            and meta.block_size == self.block_size
            and needed <= self.max_blocks_per_seq
        )

    def replay(
        self, input_ids: np.ndarray, positions: np.ndarray, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Run the recorded step on new inputs; returns the first ``meta.num_seqs`` rows of
        the step's output. The result lives in the graph's buffer: it is overwritten by the
        next replay."""
        if not self.fits(meta):
            raise ValueError(
                f"this decode graph holds {self.batch_size} sequences of up to "
                f"{self.max_blocks_per_seq} blocks of {self.block_size}; check fits() first"
            )
        n = meta.num_seqs
        if self._copied is not None:
            self._copied.synchronize()  # the previous replay's copies have left the staging
        h = self._host
        h["input_ids"][:n] = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        h["input_ids"][n:] = 0
        h["positions"][:n] = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        h["positions"][n:] = 0
        h["seq_lens"][:n] = torch.from_numpy(meta.seq_lens)
        h["seq_lens"][n:] = 1
        width = min(meta.block_tables.shape[1], self.max_blocks_per_seq)
        h["block_tables"].zero_()
        h["block_tables"][:n, :width] = torch.from_numpy(meta.block_tables[:, :width])
        h["slot_mapping"][:n] = torch.from_numpy(meta.slot_mapping)
        h["slot_mapping"][n:] = -1
        for name, dst in self._static().items():
            dst.copy_(h[name], non_blocking=True)
        if self._graph is not None:
            self._copied = torch.cuda.Event()
            self._copied.record()
            self._graph.replay()
            out = self.output
        else:
            out = self._step(self.input_ids, self.positions, self.meta)
            self.output = out
        return out[:n]


class StepGraph(CapturedGraph):
    """``Backend.capture_graph`` on CUDA: whatever ``fn`` launches, recorded as one CUDA graph.

    The engine's decode step keeps its inputs in persistent objects and updates them in place
    between replays (the HAL contract): device tensors it writes itself (token ids, positions)
    and host :class:`AttentionMetadata`. While recording, every metadata object an operator
    asks about gets static device copies of its arrays (:class:`AttentionInputs`, with
    ``max_seq_len`` bounded by the width of its block table, so grids and decode splits hold
    for any length the table can describe); ``replay()`` copies the objects' current host
    arrays into them and launches the graph.

    ``fn`` runs eagerly once on a side stream (Triton compiles its kernels, cuBLAS makes its
    workspaces: neither may happen during capture), then once more while recording, and the
    graph is replayed once so the recorded call's results hold values. On a device other than
    CUDA (the interpreter tests) replay calls ``fn`` again over the same static copies: the
    same metadata plumbing, checked without a GPU.
    """

    def __init__(self, backend: TritonBackend, fn: Callable[[], object], pool: Any = None):
        self._backend = backend
        self._fn = fn
        self._device = backend.device
        self._inputs: list[tuple[AttentionMetadata, AttentionInputs]] = []
        self._graph: torch.cuda.CUDAGraph | None = None
        backend._recording = self
        try:
            if self._device.type == "cuda":
                self._graph, _ = _capture(self._device, fn, pool, 1)
            else:
                fn()
        finally:
            backend._recording = None
        if self._graph is not None:
            self.replay()

    def static_inputs(self, meta: AttentionMetadata, cached: object) -> AttentionInputs:
        """The device copy of ``meta`` the recorded operators read (made on first use;
        ``cached`` is what the metadata held, perhaps from an eager step)."""
        for m, inputs in self._inputs:
            if m is meta and inputs is cached:
                return inputs
        bound = meta.block_tables.shape[1] * meta.block_size
        inputs = AttentionInputs.upload(meta, self._device)
        inputs.max_seq_len = max(bound, meta.max_seq_len)
        self._inputs.append((meta, inputs))
        return inputs

    def replay(self) -> None:
        for meta, inputs in self._inputs:
            inputs.copy_from(meta)
            self._backend.set_attention_inputs(meta, inputs)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._fn()
