"""Graph mode of the Ascend backend, checked on CPU by EMULATION.

torch-npu's graph API is read out of the torch-npu 2.13.0 wheel (never installed):
``torch_npu/npu/graphs.py`` for the signatures, its graph handlers for which operators
``NPUGraph.update`` re-issues and with which arguments. ``support.ascend_graph_emulation``
stands in for that API on CPU tensors with the semantics that matter (a capture freezes host
values and computes nothing; replay re-runs the recorded operators on the same tensors;
``update`` replaces the attention's lengths by name), and the npu operators run through
their documented CPU emulations. The engine's decode steps are then run recorded and eager,
and must agree exactly. Nothing here ran on an NPU.
"""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import numpy as np
import pytest
import torch
from llm_core_ascend import graphs
from llm_core_ascend.backend import AscendBackend
from llm_core_ascend.ops import TORCH_NPU_VERSION
from llm_hal import AttentionMetadata, DType
from support import ascend_emulation as emulation
from support import ascend_graph_emulation as graph_emulation
from support import ascend_schemas as schemas

BF16 = torch.bfloat16
ATTENTION = "npu_fused_infer_attention_score"


@pytest.fixture(scope="module")
def wheel() -> Any:
    if "torch_npu" in sys.modules:
        pytest.skip("a real torch-npu is loaded in this process")
    try:
        return schemas.find_wheel()
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"the torch-npu {TORCH_NPU_VERSION} wheel cannot be had here: {exc}")


@pytest.fixture(scope="module")
def npu(wheel: Any) -> Any:
    return schemas.register(schemas.read_wheel(wheel), cpu_kernels=emulation.KERNELS)


@pytest.fixture(scope="module")
def api(wheel: Any) -> schemas.GraphAPI:
    return schemas.read_graph_api(wheel)


@pytest.fixture
def runtime(api: schemas.GraphAPI) -> Any:
    return graph_emulation.runtime(api.update_keys)


# -------------------------------------------------------------------------------------------
# the API, as the wheel defines it
# -------------------------------------------------------------------------------------------


def _params(fn: Any) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p not in ("self", "cls"))


def test_the_emulated_api_has_torch_npus_signatures(api: schemas.GraphAPI, runtime: Any) -> None:
    """Every graph call the backend makes exists in torch-npu 2.13.0 with these parameters,
    and the emulation takes exactly the same ones."""
    ours = {
        "graph.__init__": runtime.graph.__init__,
        "NPUGraph.__init__": runtime.NPUGraph.__init__,
        "NPUGraph.capture_begin": runtime.NPUGraph.capture_begin,
        "NPUGraph.capture_end": runtime.NPUGraph.capture_end,
        "NPUGraph.replay": runtime.NPUGraph.replay,
        "NPUGraph.update": runtime.NPUGraph.update,
        "NPUGraph.pool": runtime.NPUGraph.pool,
        "graph_pool_handle": runtime.graph_pool_handle,
    }
    for name, fn in ours.items():
        assert name in api.signatures, f"torch-npu {TORCH_NPU_VERSION} has no {name}"
        assert _params(fn) == api.signatures[name], name
    assert "auto_dispatch_capture" in api.signatures["graph.__init__"]


def test_the_attention_lengths_are_what_torch_npu_updates(api: schemas.GraphAPI, npu: Any) -> None:
    """The fused attention is an update record in torch-npu's graphs, and the arguments the
    backend updates are the ones its handler re-issues, named as in the operator's schema."""
    schema_args = {a.name for a in getattr(npu, ATTENTION).default._schema.arguments}
    updatable = set(api.update_keys[f"{ATTENTION}.default"])
    for names in (graphs.PREFILL_LENGTHS, graphs.DECODE_LENGTHS):
        assert set(names) <= updatable
        assert set(names) <= schema_args


# -------------------------------------------------------------------------------------------
# the emulation keeps the semantics the backend depends on
# -------------------------------------------------------------------------------------------


def _decode_attention(npu: Any, lens: list[int]) -> Any:
    """A decode attention call over a filled cache: (call with host lens, the cache)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 64, generator=g).to(BF16)
    cache = torch.randn(4, 16, 64, generator=g).to(BF16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)

    def call(kv_lens: list[int]) -> torch.Tensor:
        out, _ = getattr(npu, ATTENTION)(
            q,
            cache,
            cache,
            actual_seq_lengths_kv=kv_lens,
            block_table=table,
            num_heads=4,
            input_layout="BSH",
            num_key_value_heads=4,
            block_size=16,
        )
        return out

    return call


def test_a_capture_freezes_host_lists_until_updated(npu: Any, runtime: Any) -> None:
    call = _decode_attention(npu, [5, 20])
    lens = [5, 20]
    g = runtime.NPUGraph()
    with runtime.graph(g, auto_dispatch_capture=True):
        out = call(lens)
    assert torch.isnan(out).all()  # a capture computes nothing
    g.replay()
    assert torch.equal(out, call([5, 20]))
    lens[:] = [30, 7]  # the host list changes: the recording does not see it
    g.replay()
    assert torch.equal(out, call([5, 20]))
    g.update(cpu_update_input=[{"actual_seq_lengths_kv": [30, 7]}])
    g.replay()
    assert torch.equal(out, call([30, 7]))
    assert not torch.equal(out, call([5, 20]))
    with pytest.raises(RuntimeError, match="there are 1 operators"):
        g.update(cpu_update_input=[{}, {}])


def test_the_emulation_refuses_what_a_capture_refuses(npu: Any, runtime: Any) -> None:
    call = _decode_attention(npu, [5, 20])
    g = runtime.NPUGraph()
    with runtime.graph(g):
        call([5, 20])
    with pytest.raises(RuntimeError, match="auto_dispatch_capture=True"):
        g.update(cpu_update_input=[{"actual_seq_lengths_kv": [1, 1]}])
    with pytest.raises(RuntimeError, match="host"), runtime.graph(runtime.NPUGraph()):
        torch.ones(3).sum().item()
    with pytest.raises(RuntimeError, match="before a finished capture"):
        runtime.NPUGraph().replay()


# -------------------------------------------------------------------------------------------
# the engine's decode steps, recorded and eager
# -------------------------------------------------------------------------------------------

BLOCK = 128


def _runner(hf: Any, backend: AscendBackend, dtype: DType, num_blocks: int) -> Any:
    from llm_core.engine.model_runner import ModelRunner
    from llm_core.models.registry import ARCHITECTURES

    model = ARCHITECTURES[type(hf).__name__](hf.config, backend, dtype)
    model.load_weights((n, t.detach()) for n, t in hf.state_dict().items())
    caches = [
        backend.allocate_kv_cache(num_blocks, BLOCK, model.num_kv_heads, model.head_size, dtype)
        for _ in range(model.num_layers)
    ]
    return ModelRunner(model, backend, caches, BLOCK, capture=True)


def _generate(runner: Any, prompts: list[list[int]], batches: list[int]) -> list[list[int]]:
    """Prefill every prompt, then one decode step per entry of ``batches`` over the first
    that many sequences; returns each sequence's tokens. Blocks are handed out in order."""
    from llm_core.engine.model_runner import SeqSampling
    from llm_core.engine.scheduler import ScheduledSeq, SchedulerOutput
    from llm_core.engine.sequence import Sequence
    from llm_core.sampling_params import SamplingParams

    seqs = [Sequence(f"r{i}", p, max_tokens=64) for i, p in enumerate(prompts)]
    sampling = {s.seq_id: SeqSampling(SamplingParams(temperature=0.0), 0, []) for s in seqs}
    free = iter(range(10_000))
    for s in seqs:
        s.block_table = [next(free) for _ in range(-(-(s.num_tokens + len(batches)) // BLOCK))]

    def step(active: list[Sequence]) -> None:
        items = [ScheduledSeq(s, s.num_tokens - s.num_computed_tokens) for s in active]
        scheduled = SchedulerOutput(items, [], sum(i.num_new_tokens for i in items))
        out = runner.execute(scheduled, sampling)
        for item in items:
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.append_token(out.sampled[item.seq.seq_id][0].token_id)

    step(seqs)
    for n in batches:
        step(seqs[:n])
    return [s.token_ids for s in seqs]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_recorded_decode_steps_equal_eager_ones(
    npu: Any, runtime: Any, arch: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten sequences of 3 to 150 tokens (one and two KV blocks), decoded in batches of 10, 9
    (the same recorded size 12: two, then three padding rows), 3 (a new recording) and 10
    again: every token and the whole KV cache equal the eager steps'. Mistral runs with a
    24-token sliding window (the window mask is a recorded input too)."""
    from conftest_loaders import tiny_model

    hf = tiny_model(arch, logit_scale=25.0)
    if arch == "mistral":
        hf.config.sliding_window = 24
    rng = np.random.default_rng(7)
    lengths = (3, 150, 40, 127, 9, 64, 128, 5, 90, 17)
    prompts = [rng.integers(3, 200, size=n).tolist() for n in lengths]
    batches = [10, 10, 9, 9, 3, 3, 10]
    blocks = 24
    recorded = AscendBackend("cpu", ops=npu, graph_runtime=runtime)
    eager = AscendBackend("cpu", ops=npu)
    with caplog.at_level(logging.INFO, logger="llm_core_ascend"):
        graph_runner = _runner(hf, recorded, DType.BF16, blocks)
        got = _generate(graph_runner, prompts, batches)
    eager_runner = _runner(hf, eager, DType.BF16, blocks)
    want = _generate(eager_runner, prompts, batches)
    assert got == want
    assert {size for size, g in graph_runner._graphs.items() if g.graph is not None} == {3, 12}
    assert all(isinstance(g.graph, graphs.AscendStepGraph) for g in graph_runner._graphs.values())
    assert not [r for r in caplog.records if "not recorded" in r.getMessage()]
    for (gk, gv), (ek, ev) in zip(graph_runner.kv_caches, eager_runner.kv_caches, strict=True):
        assert torch.equal(gk, ek) and torch.equal(gv, ev)


def _two_sequences() -> AttentionMetadata:
    """Decode metadata of two sequences of 4 and 9 tokens in blocks 0 and 1."""
    return AttentionMetadata(
        np.arange(3), np.array([4, 9]), np.array([[0], [1]]), np.array([3, BLOCK + 8]), BLOCK
    )


def test_a_step_reading_host_metadata_is_not_recorded(
    npu: Any, runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """fp32 attention runs the unfused reference, which reads the host metadata a graph
    would freeze: capture_graph runs the step once, eagerly, and returns None with the
    reason."""
    backend = AscendBackend("cpu", ops=npu, graph_runtime=runtime)
    key_cache, value_cache = backend.allocate_kv_cache(2, BLOCK, 2, 16, DType.FP32)
    meta = _two_sequences()
    q = torch.randn(2, 64)
    calls = []

    def step() -> None:
        calls.append(backend.paged_attention_decode(q, key_cache, value_cache, meta, 0.25))

    with caplog.at_level(logging.INFO, logger="llm_core_ascend"):
        assert backend.capture_graph(step) is None
    assert len(calls) == 1
    said = [r.getMessage() for r in caplog.records]
    assert any("not recorded" in m and "unfused" in m for m in said)


def test_replay_refuses_metadata_of_another_shape(npu: Any, runtime: Any) -> None:
    backend = AscendBackend("cpu", ops=npu, graph_runtime=runtime)
    key_cache, value_cache = backend.allocate_kv_cache(2, BLOCK, 2, 16, DType.BF16)
    meta = _two_sequences()
    q = torch.randn(2, 64).to(BF16)
    out = torch.empty(2, 64, dtype=BF16)

    def step() -> None:
        backend.reshape_and_cache(q[:, :32], q[:, 32:], key_cache, value_cache, meta)
        backend.paged_attention_decode(q, key_cache, value_cache, meta, 0.25, out=out)

    graph = backend.capture_graph(step)
    assert graph is not None
    meta.seq_lens[:] = [6, 2]  # new values in place: fine
    meta.slot_mapping[:] = [5, -1]  # a padding row: written to the scratch blocks
    graph.replay()
    meta.block_tables = np.zeros((2, 2), dtype=np.int32)
    with pytest.raises(ValueError, match="changed shape"):
        graph.replay()


def test_a_failed_capture_leaves_the_step_eager(
    npu: Any, runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A step the capture refuses (here it reads a device value on the host) is run eagerly
    and not recorded: the engine keeps serving, and the log says why."""
    backend = AscendBackend("cpu", ops=npu, graph_runtime=runtime)
    key_cache, value_cache = backend.allocate_kv_cache(2, BLOCK, 2, 16, DType.BF16)
    meta = _two_sequences()
    q = torch.randn(2, 64).to(BF16)
    results = []

    def step() -> None:
        backend.reshape_and_cache(q[:, :32], q[:, 32:], key_cache, value_cache, meta)
        o = backend.paged_attention_decode(q, key_cache, value_cache, meta, 0.25)
        results.append(float(o.float().sum().item()))

    with caplog.at_level(logging.WARNING, logger="llm_core_ascend"):
        assert backend.capture_graph(step) is None
    assert "host" in caplog.text and "not recorded" in caplog.text
    assert len(results) == 2 and results[0] == results[1]  # the eager pass, then the fallback
    assert backend._recording is None


def test_a_slice_of_a_cache_is_not_recorded(npu: Any, runtime: Any) -> None:
    """Padding rows go to the scratch blocks past the blocks handed out; a slice of a cache
    has none of its own, so a step writing into one is not recorded."""
    backend = AscendBackend("cpu", ops=npu, graph_runtime=runtime)
    key_cache, value_cache = backend.allocate_kv_cache(4, BLOCK, 2, 16, DType.BF16)
    meta = _two_sequences()
    q = torch.randn(2, 64).to(BF16)

    def step() -> None:
        backend.reshape_and_cache(q[:, :32], q[:, 32:], key_cache[:2], value_cache[:2], meta)

    assert backend.capture_graph(step) is None
    whole = backend.capture_graph(
        lambda: backend.reshape_and_cache(q[:, :32], q[:, 32:], key_cache, value_cache, meta)
    )
    assert whole is not None
