"""The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32): the engine's
greedy output equals Hugging Face transformers' token for token."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
from llm_core import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def hf_model(default_model_file: pathlib.Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(default_model_file.parent), gguf_file=default_model_file.name, dtype=torch.float32
    )
    return model.eval()


def test_greedy_matches_transformers_on_smollm2(default_model_file: pathlib.Path, hf_model) -> None:
    llm = LLM(
        str(default_model_file), dtype="float32", kv_cache_memory="64MiB", load_progress=False
    )
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    ids = [tok.encode(p) for p in PROMPTS]
    ours = [
        o.outputs[0].token_ids
        for o in llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    ]
    for prompt_ids, got in zip(ids, ours):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False
            )
        # transformers stops at EOS (and min_new_tokens would ban it): compare up to there.
        theirs = out[0, len(prompt_ids) :].tolist()
        assert len(theirs) >= 8
        assert got[: len(theirs)] == theirs
    assert "Paris" in tok.decode(ours[0])
