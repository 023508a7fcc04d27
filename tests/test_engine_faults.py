"""Faults in a step: a backend operator that raises fails only the requests of that step.

A test backend, ``faulty-cpu``, is the CPU backend with faults planted on demand (the n-th
next call of an operator raises). It is installed the way every backend is, as a plugin found
through its entry point. Each test checks that the requests of the failing step end with the
operator's error, that their KV blocks come back and nothing they wrote reaches the prefix
cache, that every other request produces exactly the tokens of a fault-free run, and that the
engine serves later requests, synchronously and through AsyncLLM. Also here: a prompt that
cannot fit in the whole KV cache is refused when it is added.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core.config import EngineArgs
from llm_core.engine.async_llm import AsyncLLM, RequestFailedError, RequestStream
from llm_core.engine.llm_engine import LLMEngine, RequestError
from llm_core.engine.sequence import Sequence
from llm_core.outputs import RequestOutput
from llm_core.sampling_params import SamplingParams
from llm_core_cpu import CpuBackend
from llm_hal import get_registry
from llm_hal.backend import CapturedGraph

PROMPTS = [
    [5, 17, 99, 23, 181, 7, 64],
    [250, 3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28, 84, 19, 71],
    [42],
    list(range(11, 46)),  # 35 tokens: two full blocks of 16 and three more
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BACKEND = "faulty-cpu"


class InjectedFault(RuntimeError):
    """What :class:`FaultyBackend` raises."""


class FaultyBackend(CpuBackend):
    """The CPU backend, with faults planted on demand: ``fail(op, call=n)`` makes the n-th
    next call of ``op`` raise :class:`InjectedFault`, once. ``op`` "replay" is the replay of
    a recorded decode step."""

    name: ClassVar[str] = BACKEND

    def __init__(self) -> None:
        super().__init__()
        self.plan: dict[str, int] = {}  # op -> calls until its fault (1: the next call)

    def fail(self, op: str, call: int = 1) -> None:
        self.plan[op] = call

    def _tick(self, op: str) -> None:
        left = self.plan.get(op)
        if left is None:
            return
        if left > 1:
            self.plan[op] = left - 1
            return
        del self.plan[op]
        raise InjectedFault(f"injected fault in {op}")

    def linear(self, *args: Any, **kwargs: Any) -> Any:
        self._tick("linear")
        return super().linear(*args, **kwargs)

    def paged_attention_decode(self, *args: Any, **kwargs: Any) -> Any:
        self._tick("paged_attention_decode")
        return super().paged_attention_decode(*args, **kwargs)

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        self._tick("sample")
        return super().sample(*args, **kwargs)

    def capture_graph(self, fn: Callable[[], object]) -> CapturedGraph | None:
        graph = super().capture_graph(fn)
        return None if graph is None else _FaultyGraph(self, graph)


class _FaultyGraph(CapturedGraph):
    def __init__(self, backend: FaultyBackend, graph: CapturedGraph):
        self.backend, self.graph = backend, graph

    def replay(self) -> None:
        self.backend._tick("replay")
        self.graph.replay()


PLUGIN = f'''
"""Entry point of the {BACKEND} test backend."""
from llm_hal import HAL_API_VERSION, Availability, BackendSpec, hookimpl


def factory(config):
    from test_engine_faults import FaultyBackend

    return FaultyBackend()


@hookimpl
def llm_core_backends():
    return BackendSpec(name={BACKEND!r}, version="0", api_version=HAL_API_VERSION,
                       priority=-1, probe=Availability.yes, factory=factory)
'''


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A tiny llama checkpoint, with the faulty-cpu plugin installed while the module runs."""
    plugin = tmp_path_factory.mktemp("plugin")
    (plugin / "llm_test_faulty_cpu.py").write_text(textwrap.dedent(PLUGIN))
    info = plugin / "llm_test_faulty_cpu-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-test-faulty-cpu\nVersion: 0\n")
    entry_points = f"[llm_core.backends]\n{BACKEND} = llm_test_faulty_cpu\n"
    (info / "entry_points.txt").write_text(entry_points)
    model = tmp_path_factory.mktemp("faults") / "llama"
    save_tiny_hf_checkpoint(model, "llama")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(plugin))
        for name in ("LLM_CORE_BACKENDS", "LLM_CORE_DISABLED_BACKENDS", "LLM_CORE_FALLBACK"):
            mp.delenv(name, raising=False)
        get_registry(refresh=True)
        yield model
    sys.modules.pop("llm_test_faulty_cpu", None)
    get_registry(refresh=True)


MakeEngine = Callable[..., tuple[LLMEngine, FaultyBackend]]


@pytest.fixture
def make_engine(checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> MakeEngine:
    """A fresh engine on faulty-cpu (decode steps run eagerly unless ``record=True``)."""

    def make(record: bool = False, **kwargs: Any) -> tuple[LLMEngine, FaultyBackend]:
        monkeypatch.setenv("LLM_CORE_ENFORCE_EAGER", "0" if record else "1")
        kwargs.setdefault("kv_cache_memory", "4MiB")
        args = EngineArgs(
            model=str(checkpoint), backend=BACKEND, dtype="float32", load_progress=False, **kwargs
        )
        engine = LLMEngine(args)
        assert isinstance(engine.backend, CpuBackend) and engine.backend.name == BACKEND
        return engine, engine.backend  # type: ignore[return-value]

    return make


@pytest.fixture(scope="module")
def reference(checkpoint: pathlib.Path) -> list[list[int]]:
    """The tokens of each prompt in a fault-free run (greedy: batch-independent)."""
    engine = LLMEngine(
        EngineArgs(
            model=str(checkpoint), backend=BACKEND, dtype="float32", load_progress=False,
            kv_cache_memory="4MiB",
        )
    )  # fmt: skip
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    done = run(engine)
    return [done[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))]


def run(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step until every request has finished; their last outputs by request id."""
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    return finished


def assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished
    assert bm.num_available_blocks == bm.num_blocks, "every KV block is back"


def assert_failed(output: RequestOutput, op: str) -> None:
    assert output.finished
    assert output.error is not None and f"injected fault in {op}" in output.error
    assert f"backend {BACKEND}" in output.error and "InjectedFault" in output.error
    assert all(c.finish_reason == "error" for c in output.outputs)


# ---- the synchronous engine ----------------------------------------------------------------


def test_a_failed_decode_fails_only_the_requests_of_its_step(
    make_engine: MakeEngine, reference: list[list[int]]
) -> None:
    engine, backend = make_engine(max_num_seqs=2)
    for rid, prompt in zip("abc", PROMPTS):
        engine.add_request(rid, prompt, GREEDY)
    first = engine.step()  # a and b prefill; c waits (two running at most)
    assert sorted(o.request_id for o in first) == ["a", "b"]

    backend.fail("paged_attention_decode")
    failed = engine.step()
    assert sorted(o.request_id for o in failed) == ["a", "b"]
    for output, tokens in zip(sorted(failed, key=lambda o: o.request_id), reference):
        assert_failed(output, "paged_attention_decode")
        assert output.outputs[0].token_ids == tokens[:1]  # made before the fault: kept
    assert engine.get_num_unfinished_requests() == 1  # c, untouched

    done = run(engine)
    assert list(done) == ["c"] and done["c"].error is None
    assert done["c"].outputs[0].token_ids == reference[2]
    assert done["c"].outputs[0].finish_reason == "length"
    assert_idle(engine)

    # the engine keeps working: the failed prompts again, from scratch
    engine.add_request("a2", PROMPTS[0], GREEDY)
    engine.add_request("b2", PROMPTS[1], GREEDY)
    done = run(engine)
    assert done["a2"].outputs[0].token_ids == reference[0]
    assert done["b2"].outputs[0].token_ids == reference[1]
    assert_idle(engine)


def test_a_sampling_fault_fails_the_whole_request_even_its_waiting_completions(
    make_engine: MakeEngine, reference: list[list[int]]
) -> None:
    engine, backend = make_engine(max_num_seqs=1)
    engine.add_request("x", PROMPTS[0], SamplingParams(n=2, temperature=0, max_tokens=8))
    engine.add_request("y", PROMPTS[1], GREEDY)
    engine.step()  # x's first completion prefills; its second and y wait
    backend.fail("sample")
    (failed,) = engine.step()
    assert failed.request_id == "x" and len(failed.outputs) == 2
    assert_failed(failed, "sample")
    assert [len(c.token_ids) for c in failed.outputs] == [1, 0]
    done = run(engine)
    assert list(done) == ["y"] and done["y"].outputs[0].token_ids == reference[1]
    assert_idle(engine)


def test_a_failed_prefill_leaves_nothing_it_wrote_in_the_prefix_cache(
    make_engine: MakeEngine, reference: list[list[int]]
) -> None:
    engine, backend = make_engine(max_num_batched_tokens=16)
    bm = engine.block_manager
    assert engine.block_size == 16

    def cached_tokens(prompt: list[int]) -> int:
        return bm.get_computed_blocks(Sequence("probe", prompt, 1))[1]

    # A whole prefill fails at its first operator: none of its blocks is cached.
    backend.fail("linear")
    engine.add_request("whole", PROMPTS[1], GREEDY)  # 22 tokens: one full block
    (failed,) = engine.step()
    assert_failed(failed, "linear")
    assert failed.outputs[0].token_ids == []
    assert cached_tokens(PROMPTS[1]) == 0 and bm.num_evictable_blocks == 0
    assert_idle(engine)

    # A chunked prefill fails in its second chunk: the first chunk's block was computed and
    # stays cached; the block the second chunk was writing does not enter the cache.
    engine.add_request("chunked", PROMPTS[3], GREEDY)  # 35 tokens, 16 a step
    assert engine.step() == []  # chunk 1: tokens [0, 16)
    assert cached_tokens(PROMPTS[3]) == 16
    backend.fail("linear")
    (failed,) = engine.step()  # chunk 2: tokens [16, 32)
    assert_failed(failed, "linear")
    assert cached_tokens(PROMPTS[3]) == 16
    assert_idle(engine)

    # The same prompts again: the cached block is reused and the tokens are right.
    engine.add_request("chunked2", PROMPTS[3], GREEDY)
    engine.add_request("whole2", PROMPTS[1], GREEDY)
    done = run(engine)
    assert done["chunked2"].num_cached_tokens == 16
    assert done["chunked2"].outputs[0].token_ids == reference[3]
    assert done["whole2"].outputs[0].token_ids == reference[1]
    assert_idle(engine)


def test_a_prefill_fault_also_fails_the_decodes_sharing_its_step(
    make_engine: MakeEngine, reference: list[list[int]]
) -> None:
    engine, backend = make_engine(max_num_seqs=2)
    engine.add_request("decoding", PROMPTS[0], GREEDY)
    engine.step()
    engine.add_request("prefilling", PROMPTS[1], GREEDY)
    engine.add_request("waiting", PROMPTS[2], GREEDY)
    backend.fail("linear")
    failed = engine.step()  # one batch: a decode and a prefill
    assert sorted(o.request_id for o in failed) == ["decoding", "prefilling"]
    for output in failed:
        assert_failed(output, "linear")
    done = run(engine)
    assert list(done) == ["waiting"] and done["waiting"].outputs[0].token_ids == reference[2]
    assert_idle(engine)


def test_a_fault_while_recording_or_replaying_a_decode_graph_drops_the_graph(
    make_engine: MakeEngine, reference: list[list[int]]
) -> None:
    engine, backend = make_engine(record=True)
    graphs = engine.runner._graphs
    records = backend._nk is not None  # without the C kernels nothing is recorded

    def decode_pair(tag: str) -> dict[str, RequestOutput]:
        engine.add_request(f"a{tag}", PROMPTS[0], GREEDY)
        engine.add_request(f"b{tag}", PROMPTS[1], GREEDY)
        engine.step()  # both prefill; the next step decodes them as a batch of two
        return {o.request_id: o for o in engine.step()}

    backend.fail("paged_attention_decode")  # raises while the batch-2 graph records
    failed = decode_pair("1")
    assert sorted(failed) == ["a1", "b1"]
    for output in failed.values():
        assert_failed(output, "paged_attention_decode")
    assert 2 not in graphs, "a graph whose recording failed is dropped"
    assert_idle(engine)

    decode_pair("2")  # records afresh
    done = run(engine)
    assert done["a2"].outputs[0].token_ids == reference[0]
    assert done["b2"].outputs[0].token_ids == reference[1]
    assert_idle(engine)
    if not records:
        return
    assert graphs[2].graph is not None

    backend.fail("replay")
    failed = decode_pair("3")
    assert sorted(failed) == ["a3", "b3"]
    for output in failed.values():
        assert_failed(output, "replay")
    assert 2 not in graphs, "a graph whose replay failed is dropped"
    decode_pair("4")
    done = run(engine)
    assert done["a4"].outputs[0].token_ids == reference[0]
    assert done["b4"].outputs[0].token_ids == reference[1]
    assert graphs[2].graph is not None
    assert_idle(engine)


# ---- admission -----------------------------------------------------------------------------


def test_a_prompt_larger_than_the_whole_kv_cache_is_refused_when_added(
    make_engine: MakeEngine,
) -> None:
    probe, _ = make_engine()
    per_block = probe.kv_cache_bytes // probe.memory_report["kv_cache_blocks"]
    engine, _ = make_engine(kv_cache_memory=2 * per_block)  # two blocks: 32 tokens
    assert engine.block_manager.num_blocks == 2 and engine.max_model_len > 33
    with pytest.raises(RequestError) as refused:
        engine.add_request("big", list(range(5, 37)), GREEDY)  # 32 tokens, +1 generated
    assert str(refused.value) == (
        "the prompt has 32 tokens (plus 1 generated) and needs 3 KV-cache blocks of 16 "
        "tokens, but the whole KV cache has 2 blocks (32 tokens); shorten the prompt to at "
        "most 31 tokens or give the KV cache more memory (kv_cache_memory)"
    )
    assert not engine.has_unfinished_requests()
    # The largest prompt that fits is served until the cache is full: the KV of 32 tokens
    # and the token sampled from the last of them.
    engine.add_request("fits", list(range(5, 36)), GREEDY)
    out = run(engine)["fits"].outputs[0]
    assert 31 + len(out.token_ids) == 33 and out.finish_reason == "length"
    assert_idle(engine)


def test_stop_token_ids_outside_the_vocabulary_are_refused(make_engine: MakeEngine) -> None:
    engine, _ = make_engine()
    vocab = engine.model.vocab_size
    params = SamplingParams(stop_token_ids=[3, vocab], min_tokens=2)
    with pytest.raises(RequestError, match=rf"stop_token_ids \[{vocab}\] are outside"):
        engine.add_request("r", PROMPTS[0], params)
    assert not engine.has_unfinished_requests()


# ---- AsyncLLM ------------------------------------------------------------------------------


async def _drain(stream: RequestStream) -> RequestOutput:
    last = None
    async for output in stream:
        last = output
    assert last is not None and last.finished
    return last


def test_async_a_failed_request_raises_in_its_stream_and_the_others_finish(
    make_engine: MakeEngine, reference: list[list[int]]
) -> None:
    engine, backend = make_engine(max_num_seqs=1)
    llm = AsyncLLM(engine)

    async def scenario() -> None:
        # One sequence runs at a time, so the next sampling is a's first step alone.
        backend.fail("sample")
        a = await llm.add_request("a", PROMPTS[0], GREEDY)
        b = await llm.add_request("b", PROMPTS[1], GREEDY)
        with pytest.raises(RequestFailedError, match="injected fault in sample") as failed:
            await _drain(a)
        assert failed.value.request_id == "a"
        assert failed.value.output.outputs[0].finish_reason == "error"
        assert (await _drain(b)).outputs[0].token_ids == reference[1]
        assert llm.is_alive

        # later requests are served
        c = await llm.add_request("c", PROMPTS[2], GREEDY)
        assert (await _drain(c)).outputs[0].token_ids == reference[2]

        # a stream of several requests ends at the first failure; the rest are aborted
        backend.fail("sample")
        both = await llm.add_requests([("d", PROMPTS[0], GREEDY), ("e", PROMPTS[3], GREEDY)])
        with pytest.raises(RequestFailedError, match="request d failed"):
            await _drain(both)
        assert both.finished and llm.num_pending == 0
        assert llm.is_alive

    try:
        asyncio.run(scenario())
    finally:
        llm.shutdown()
    assert_idle(engine)  # read once the engine thread has stopped


def test_server_answers_500_for_the_failed_request_and_keeps_serving(
    make_engine: MakeEngine, checkpoint: pathlib.Path
) -> None:
    """Over HTTP: the failed request gets a 500 (a stream, an error event) with the op's
    message; the next requests are served."""
    from fastapi.testclient import TestClient
    from llm_core.entrypoints.openai.api_server import create_app
    from llm_core.entrypoints.openai.config import ServerConfig

    engine, backend = make_engine()
    app = create_app(AsyncLLM(engine), ServerConfig(model_name="tiny"))
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    with TestClient(app) as client:
        backend.fail("sample")
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["code"] == "request_failed" and "injected fault in sample" in error["message"]
        assert client.post("/v1/completions", json=body).status_code == 200
        backend.fail("sample", call=2)
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            assert stream.status_code == 200
            events = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert any("injected fault in sample" in e and "request_failed" in e for e in events)
        assert client.post("/v1/completions", json=body).status_code == 200
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
