"""AsyncLLM, the engine thread behind the server: all-or-none admission, the bounded queue,
abort on early exit, and shutdown with requests in flight. One tiny engine, real threads."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core.config import EngineArgs
from llm_core.engine.async_llm import AsyncLLM, EngineDeadError, EngineOverloadedError
from llm_core.engine.llm_engine import LLMEngine, RequestError
from llm_core.metrics import EngineMetrics
from llm_core.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMEngine]:
    model = tmp_path_factory.mktemp("async") / "tiny"
    save_tiny_hf_checkpoint(model, "llama")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    args = EngineArgs(
        model=str(model), backend="cpu", dtype="float32", kv_cache_memory="1MiB",
        load_progress=False, fallback_backend="cpu",  # fallback on: the metrics name it
    )  # fmt: skip
    yield LLMEngine(args)
    torch.set_num_threads(threads)


def _idle(engine: LLMEngine) -> bool:
    # Only read once the engine thread has stopped (shutdown joins it).
    return not engine.has_unfinished_requests() and engine.block_manager.usage == 0


def test_admission_queue_abort_and_shutdown(engine: LLMEngine) -> None:
    metrics = EngineMetrics("tiny")
    llm = AsyncLLM(engine, max_pending=2, metrics=metrics)

    async def scenario() -> None:
        # all or none: the second prompt is invalid, so the first is not queued either
        with pytest.raises(RequestError, match="outside the vocabulary"):
            await llm.add_requests([("a", [5, 6], LONG), ("b", [10**6], LONG)])
        assert llm.num_pending == 0
        with pytest.raises(RequestError, match="send fewer prompts"):
            await llm.add_requests([(str(i), [5], LONG) for i in range(3)])

        # a whole request, through the convenience generator
        outputs = [o async for o in llm.generate([5, 6, 7], SamplingParams(max_tokens=4), "g")]
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 4
        assert llm.num_pending == 0

        # the queue bound: two in flight, the third is refused and nothing changes
        first = await llm.add_request("1", [5, 6, 7], LONG)
        second = await llm.add_request("2", [8, 9], LONG)
        with pytest.raises(EngineOverloadedError) as refused:
            await llm.add_request("3", [5], LONG)
        assert refused.value.retry_after >= 1 and llm.num_pending == 2

        # leaving a stream early aborts it and frees its slot at once
        async with first:
            async for _ in first:
                break
        assert llm.num_pending == 1
        third = await llm.add_request("3", [5], LONG)

        # shutdown with requests in flight: their streams end with EngineDeadError
        await asyncio.to_thread(llm.shutdown)
        for stream in (second, third):
            with pytest.raises(EngineDeadError, match="shutting down"):
                async for _ in stream:
                    pass
        assert llm.num_pending == 0 and not llm.is_alive
        with pytest.raises(EngineDeadError):
            await llm.add_request("4", [5], LONG)

    asyncio.run(scenario())
    assert _idle(engine)
    text = metrics.render()[0].decode()
    assert 'llm_core_request_success_total{finished_reason="abort",model_name="tiny"} 3.0' in text
    assert 'llm_core_request_success_total{finished_reason="length",model_name="tiny"} 1.0' in text
    assert 'llm_core_kv_cache_blocks_in_use{model_name="tiny"} 0.0' in text
    # cpu lacks no operator, so nothing fell back to the (cpu) fallback backend
    fallback = 'llm_core_backend_fallback_calls_total{backend="cpu",fallback_backend="cpu",'
    assert fallback + 'model_name="tiny"} 0.0' in text
