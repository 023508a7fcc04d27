"""The decode-graph contract of the CUDA/ROCm backends, checked without a GPU.

A :class:`DecodeGraph` records a decode step once over static buffers and replays it on new
inputs. On a CPU device (Triton interpreter) replay calls the step again on the same static
buffers, which checks what matters for a real CUDA graph: every operator reads the step's
metadata from the buffers the graph fills (the template metadata the step was recorded with
holds padding only, so an operator that read it would give wrong results), padding rows write
nothing to the KV cache, and the bounds are enforced.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
from llm_triton.kernels.config import require_interpreter

require_interpreter()

from llm_hal import AttentionMetadata, TorchBackend  # noqa: E402
from llm_triton.backend import TritonBackend  # noqa: E402
from llm_triton.graphs import bucket_for  # noqa: E402
from llm_triton.kernels import KernelConfig  # noqa: E402
from llm_triton.selfcheck import ToyDecoder, compare, decode_step_inputs  # noqa: E402

CONFIG = KernelConfig(
    prefill_block_m=16, prefill_block_n=16, decode_block_n=16, num_sms=8, elementwise_block=64
)
BLOCK, MAX_BLOCKS, BATCH = 4, 8, 4


@pytest.fixture
def models():
    backend = TritonBackend("cpu", CONFIG)
    blocks = BATCH * MAX_BLOCKS
    toy = ToyDecoder.build(backend, blocks, BLOCK, torch.float32, seed=5)
    eager = ToyDecoder.build(TorchBackend("cpu"), blocks, BLOCK, torch.float64, seed=5)
    return backend, toy, eager


def test_replay_matches_eager_steps(models):
    backend, toy, eager = models
    graph = backend.capture_decode(toy.step, BATCH, MAX_BLOCKS, BLOCK)
    assert graph is not None
    untouched = toy.key_cache.clone()  # recording must not write the cache (all slots -1)
    assert torch.equal(toy.key_cache, untouched)
    # Two steps of different batch sizes and lengths, as the engine would replay them.
    for seed, lens in enumerate(([17, 5, 32], [1, 9, 30, 2], [32])):
        ids, pos, meta = decode_step_inputs(lens, BLOCK, MAX_BLOCKS, seed)
        got = graph.replay(ids, pos, meta)
        want = eager.step(torch.from_numpy(ids), torch.from_numpy(pos), meta)
        assert got.shape == (len(lens), 64)
        result = compare(got, want, torch.float32, "attention")
        assert result.ok, result
        # The caches hold exactly what the reference wrote: padding rows wrote nothing.
        assert compare(toy.key_cache, eager.key_cache, torch.float32, "elementwise").ok
        assert compare(toy.value_cache, eager.value_cache, torch.float32, "elementwise").ok


def test_graph_bounds(models):
    backend, toy, _ = models
    graph = backend.capture_decode(toy.step, 2, MAX_BLOCKS, BLOCK)
    assert graph is not None
    ok = decode_step_inputs([5, 32], BLOCK, MAX_BLOCKS, 0)[2]
    too_many = decode_step_inputs([5, 6, 7], BLOCK, MAX_BLOCKS, 0)[2]
    too_long = decode_step_inputs([33], BLOCK, MAX_BLOCKS + 1, 0)[2]
    prefill = AttentionMetadata(
        np.array([0, 3]), np.array([3]), np.zeros((1, 1)), np.arange(3), BLOCK
    )
    assert graph.fits(ok)
    assert not graph.fits(too_many) and not graph.fits(too_long) and not graph.fits(prefill)
    with pytest.raises(ValueError, match="check fits"):
        graph.replay(np.zeros(3), np.zeros(3), too_many)


def test_graphs_can_be_turned_off(models):
    _, toy, _ = models
    backend = TritonBackend("cpu", CONFIG, graphs=False)
    assert backend.capture_decode(toy.step, 1, MAX_BLOCKS, BLOCK) is None


@pytest.mark.parametrize(
    ("batch", "bucket"), [(1, 1), (3, 4), (8, 8), (9, 16), (200, 256), (257, None)]
)
def test_bucket_for(batch, bucket):
    assert bucket_for(batch) == bucket


def _assign(meta: AttentionMetadata, new: AttentionMetadata) -> None:
    """Update ``meta`` in place to describe ``new``, as the engine does between replays."""
    for name in ("query_start_loc", "seq_lens", "block_tables", "slot_mapping"):
        getattr(meta, name)[...] = getattr(new, name)
    meta.device_cache.clear()


def test_capture_graph_hook_replays_inputs_updated_in_place(models):
    """The HAL hook the engine records decode steps with: the step's inputs live in
    persistent objects (device token ids and positions, host metadata) updated in place,
    and each replay computes the step they now describe."""
    backend, toy, eager = models
    ids0, pos0, first = decode_step_inputs([17, 5, 32], BLOCK, MAX_BLOCKS, 0)
    meta = AttentionMetadata(
        first.query_start_loc.copy(), first.seq_lens.copy(), first.block_tables.copy(),
        first.slot_mapping.copy(), BLOCK,
    )  # fmt: skip
    ids, pos = torch.from_numpy(ids0.copy()), torch.from_numpy(pos0.copy())
    out: dict[str, torch.Tensor] = {}

    def step() -> None:
        out["y"] = toy.step(ids, pos, meta)

    graph = backend.capture_graph(step)
    assert graph is not None
    # The operators read static device copies, sized for any length the block table holds.
    recorded = backend.attention_inputs(meta)
    assert recorded.max_seq_len == MAX_BLOCKS * BLOCK
    want = eager.step(torch.from_numpy(ids0), torch.from_numpy(pos0), first)
    assert compare(out["y"], want, torch.float32, "attention").ok  # the recorded call's result
    for seed, lens in enumerate(([1, 9, 30], [32, 2, 7], [4, 4, 4]), start=1):
        new_ids, new_pos, new = decode_step_inputs(lens, BLOCK, MAX_BLOCKS, seed)
        ids.copy_(torch.from_numpy(new_ids))
        pos.copy_(torch.from_numpy(new_pos))
        _assign(meta, new)
        graph.replay()
        assert backend.attention_inputs(meta) is recorded  # refilled, not uploaded anew
        assert torch.equal(recorded.block_tables.cpu(), torch.from_numpy(new.block_tables))
        want = eager.step(torch.from_numpy(new_ids), torch.from_numpy(new_pos), new)
        result = compare(out["y"], want, torch.float32, "attention")
        assert result.ok, (lens, result)
        assert compare(toy.key_cache, eager.key_cache, torch.float32, "elementwise").ok
        assert compare(toy.value_cache, eager.value_cache, torch.float32, "elementwise").ok


def test_capture_graph_hook_refuses_reshaped_inputs(models):
    backend, toy, _ = models
    ids, pos, meta = decode_step_inputs([3, 8], BLOCK, MAX_BLOCKS, 0)
    graph = backend.capture_graph(
        lambda: toy.step(torch.from_numpy(ids), torch.from_numpy(pos), meta)
    )
    assert graph is not None
    meta.block_tables = meta.block_tables[:, :2].copy()  # replaced, not updated in place
    with pytest.raises(ValueError, match="block_tables of shape"):
        graph.replay()


def test_capture_graph_off_runs_the_step_once():
    backend = TritonBackend("cpu", CONFIG, graphs=False)
    calls = []
    assert backend.capture_graph(lambda: calls.append(1)) is None
    assert calls == [1]
