"""The `llm-core` command line: generate and chat on a tiny checkpoint, and --help everywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest_loaders import save_tiny_hf_checkpoint
from llm_core import LLM, SamplingParams


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "llm_core.cli", *args],
        input=stdin, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli-llama")
    save_tiny_hf_checkpoint(path, "llama")
    return str(path)


def test_generate_prints_the_engines_greedy_text(checkpoint: str) -> None:
    result = run_cli("generate", "--model", checkpoint, "--dtype", "float32", "--max-tokens", "8",
                     "Hello world")  # fmt: skip
    assert result.returncode == 0, result.stderr
    llm = LLM(checkpoint, dtype="float32", kv_cache_memory="4MiB", load_progress=False)
    expected = llm.generate(
        "Hello world", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert result.stdout == expected[0].outputs[0].text + "\n"


def test_chat_streams_replies_and_keeps_history(checkpoint: str) -> None:
    result = run_cli("chat", "--model", checkpoint, "--dtype", "float32", "--max-tokens", "6",
                     stdin="Hello\nHow are you?\n\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    llm = LLM(checkpoint, dtype="float32", kv_cache_memory="4MiB", load_progress=False)
    params = SamplingParams(temperature=0, max_tokens=6)
    first = llm.chat([{"role": "user", "content": "Hello"}], params, use_tqdm=False)
    reply = first[0].outputs[0].text
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "How are you?"}]  # fmt: skip
    second = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
    assert result.stdout == f"{reply}\n{second}\n"


def test_bad_model_path_is_a_clear_error() -> None:
    result = run_cli("generate", "--model", "/nonexistent/model", "hi")
    assert result.returncode == 1
    assert "llm-core: error:" in result.stderr and "/nonexistent/model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["plugins"]])
def test_help(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: llm-core" in result.stdout
