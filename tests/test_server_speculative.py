"""Speculative decoding in the server: a real ``llm-core serve --speculative-config`` subprocess
on a tiny random-weight Llama, driven with the official ``openai`` client.

Greedy completions, whole and streamed, must equal the offline ``LLM`` without speculation;
``/metrics`` must carry vLLM's spec_decode counters (consistent with each other) only when
speculation is on; a bad ``--speculative-config`` is one ``llm-core: error:`` line.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict

import httpx
import openai
import pytest
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core import LLM, SamplingParams
from llm_core.cli import main
from llm_core.config import EngineArgs
from llm_core.engine.llm_engine import LLMEngine
from llm_core.metrics import EngineMetrics

K = 4
SPEC = f'{{"method": "ngram", "num_speculative_tokens": {K}}}'
#: Prompts that repeat themselves, so that prompt lookup finds n-grams from the first step.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "one two three four five one two three four five one two three",
    "A paged KV cache stores keys and values. A paged KV cache stores",
]
SPEC_SERIES = (
    "llm_core_spec_decode_num_drafts_total",
    "llm_core_spec_decode_num_draft_tokens_total",
    "llm_core_spec_decode_num_accepted_tokens_total",
)


class SpecServer:
    """``llm-core serve MODEL --speculative-config SPEC`` on a free port of 127.0.0.1."""

    def __init__(self, model: pathlib.Path, log: pathlib.Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        command = [
            sys.executable, "-m", "llm_core.cli", "serve", str(model), "--port", str(self.port),
            "--served-model-name", "tiny", "--backend", "cpu", "--dtype", "float32",
            "--kv-cache-memory", "4MiB", "--speculative-config", SPEC,
        ]  # fmt: skip
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 150.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not ready after {timeout}s:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{name{labels}: value}``, with the model_name label dropped."""
        return _parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _engine_args(model: pathlib.Path) -> EngineArgs:
    """The engine settings of SpecServer, without speculation."""
    return EngineArgs(
        model=str(model), backend="cpu", dtype="float32", kv_cache_memory="4MiB",
        load_progress=False,
    )  # fmt: skip


def _parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'model_name="[^"]*",?', "", key).replace(",}", "}").replace("{}", "")
            values[key] = float(value)
    return values


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    model = tmp_path_factory.mktemp("spec-server") / "tiny-llama"
    save_tiny_hf_checkpoint(model, "llama")
    return model


@pytest.fixture(scope="module")
def server(model_dir: pathlib.Path) -> Iterator[SpecServer]:
    process = SpecServer(model_dir, model_dir.parent / "server.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: SpecServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_dir: pathlib.Path, server: SpecServer) -> list[str]:
    """The greedy completions of PROMPTS by the offline LLM without speculation (loaded while
    the server starts)."""
    llm = LLM(**asdict(_engine_args(model_dir)))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    return [out.outputs[0].text for out in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_metrics_exposed_before_the_first_request(server: SpecServer) -> None:
    metrics = server.metrics()
    for name in SPEC_SERIES:
        assert name in metrics, name
    positions = [
        key for key in metrics if key.startswith("llm_core_spec_decode_num_accepted_tokens_per_pos")
    ]
    assert sorted(positions) == [
        f'llm_core_spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'
        for i in range(K)
    ]


def test_greedy_completions_equal_offline_without_speculation(
    client: openai.OpenAI, offline: list[str]
) -> None:
    result = client.completions.create(
        model="tiny", prompt=PROMPTS, max_tokens=24, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    texts = [c.text for c in sorted(result.choices, key=lambda c: c.index)]
    assert texts == offline
    assert result.usage is not None and result.usage.completion_tokens == 24 * len(PROMPTS)


def test_streaming_equals_offline(client: openai.OpenAI, offline: list[str]) -> None:
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    pieces, usage = [], None
    for chunk in stream:
        pieces += [c.text for c in chunk.choices if c.text]
        usage = chunk.usage or usage
    assert "".join(pieces) == offline[1]
    assert usage is not None and usage.completion_tokens == 24
    assert len(pieces) > 1  # streamed in several chunks, not one


def test_spec_decode_counters_are_consistent(server: SpecServer, client: openai.OpenAI) -> None:
    client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=32, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    m = server.metrics()
    drafts, proposed, accepted = (m[name] for name in SPEC_SERIES)
    per_pos = [
        m[f'llm_core_spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}']
        for i in range(K)
    ]
    assert drafts > 0
    assert 0 <= accepted <= proposed <= K * drafts
    assert sum(per_pos) == accepted
    assert all(a >= b for a, b in itertools.pairwise(per_pos))  # a prefix accepted
    assert per_pos[0] <= drafts
    # Every generated token is either a verification's own draw or an accepted proposal.
    assert m["llm_core_generation_tokens_total"] >= accepted


def test_no_spec_decode_series_without_speculation(model_dir: pathlib.Path) -> None:
    metrics = EngineMetrics("tiny")
    metrics.update_engine_state(LLMEngine(_engine_args(model_dir)))
    text = metrics.render()[0].decode()
    assert "llm_core_kv_cache_blocks_total" in text
    assert "spec_decode" not in text


@pytest.mark.parametrize(
    ("command", "value", "says"),
    [
        ("serve", "{not json", "not valid JSON"),
        ("generate", '{"method": "ngram"}', "num_speculative_tokens"),
        ("serve", '{"method": "eagle", "num_speculative_tokens": 2}', "method 'eagle'"),
        ("bench", '{"method": "ngram", "num_speculative_tokens": 4, "k": 1}', "unknown field"),
    ],
)
def test_bad_speculative_config_is_one_error_line(
    command: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--speculative-config", value]
    if command == "bench":
        argv = ["bench", "latency", "--no-roofline", "--speculative-config", value]
    code = main([*argv, "hello"] if command == "generate" else argv)
    err = capsys.readouterr().err
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("llm-core: error: speculative_config") and says in line
