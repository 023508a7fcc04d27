"""The models of the model level, and their Hugging Face transformers references.

For every architecture the engine supports, a tiny random-weight checkpoint is built with
transformers (weights drawn from the run's seed, output projection scaled so next-token
distributions are as peaked as a trained model's). The real models of ``REAL_MODELS`` (the demo
model SmolLM2-135M-Instruct and Gemma 3 270M, llm-core's built-in models) join when they can be
fetched. The reference is transformers' own forward pass on the same weights:
for the tiny checkpoints it loads the saved safetensors; for a GGUF real model it loads the
tensors the engine's loader produces (dequantized, un-permuted), because transformers' own GGUF
reader takes a minute. The loader itself is checked against transformers' reader by the
project's tests, not here.
"""

from __future__ import annotations

import copy
import os
import pathlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_conformance.checkpoints import TINY_VOCAB, model_type_of, save_tiny_hf_checkpoint

#: Output-projection scale of the tiny checkpoints: logits with a standard deviation near 4.
TINY_LOGIT_SCALE = 25.0

#: Teacher-forced text for the real model: plain prose, tokenized with the model's tokenizer.
REAL_TEXT = (
    "The history of computing is a story of machines that became smaller, faster and cheaper "
    "with every decade. Early computers filled entire rooms and were programmed by rewiring "
    "panels of cables. Later, stored programs allowed the same machine to solve many different "
    "problems, and high-level languages made programming accessible to scientists and "
    "engineers. Today a phone in a pocket holds more memory than all the computers of 1960 "
    "combined, and large language models answer questions in plain English. Yet the basic "
    "ideas have changed little: a processor fetches an instruction, reads its operands, "
    "computes a result and writes it back to memory, billions of times every second."
)
REAL_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
)


@dataclass(frozen=True, slots=True)
class RealModel:
    """A real checkpoint of the matrix: one of llm-core's built-in models, fetched by name."""

    key: str  # the built-in model's name (llm_core.loaders.BUILTIN_MODELS): "smollm2"
    name: str  # the matrix row
    aliases: tuple[str, ...]  # what --model accepts for it (lower case)
    text: str  # teacher-forced text
    prompts: tuple[str, ...]  # greedy prompts, in the model's own chat format where chatty


#: Gemma's 262k-token vocabulary makes each teacher-forced logits tensor ~2 MB a token (in
#: float64): a shorter text keeps the references of three dtypes near 0.5 GB.
_GEMMA3_TEXT = REAL_TEXT.split(" Today")[0]

#: The real-model rows of the matrix, in order; ``--no-real-model`` leaves them all out.
REAL_MODELS: dict[str, RealModel] = {
    "smollm2": RealModel(
        "smollm2", "SmolLM2-135M-Instruct", ("smollm2", "demo", "real"), REAL_TEXT, REAL_PROMPTS
    ),
    "gemma3-270m": RealModel(
        "gemma3-270m",
        "Gemma-3-270M",
        ("gemma3-270m",),
        _GEMMA3_TEXT,
        (
            "The capital of France is",
            "def fibonacci(n):",
            "<start_of_turn>user\nName three colors.<end_of_turn>\n<start_of_turn>model\n",
        ),
    ),
}
REAL_NAME = REAL_MODELS["smollm2"].name  # the demo model's row


def real_model_spec(name: str) -> RealModel | None:
    """The real model ``name`` stands for (a key or an alias, any case), or ``None``."""
    wanted = name.strip().lower()
    return next((m for m in REAL_MODELS.values() if wanted in (m.key, *m.aliases)), None)


@dataclass(slots=True)
class ModelUnderTest:
    """One row of the matrix: a checkpoint on disk and the token sequences it is tested on."""

    name: str  # the matrix row: an HF architecture name, or the real model's name
    architecture: str  # the HF architecture name the engine dispatches on
    path: pathlib.Path
    kind: str  # "tiny" or "real"
    sequences: list[list[int]]  # teacher-forced: logits at every position
    prompts: list[list[int]]  # greedy decoding
    audit_prompts: list[list[int]] = field(default_factory=list)
    _references: dict[torch.dtype, Any] = field(default_factory=dict, repr=False)
    _checkpoint: Any = field(default=None, repr=False)

    @property
    def checkpoint(self) -> Any:
        """The checkpoint, opened once (parsing a GGUF file's metadata takes seconds)."""
        if self._checkpoint is None:
            from llm_core.loaders import open_checkpoint

            self._checkpoint = open_checkpoint(self.path)
        return self._checkpoint

    def reference(self, dtype: torch.dtype) -> Any:
        """The transformers model with the same weights, in ``dtype`` (cached; other dtypes
        are converted copies of the float32 model)."""
        if dtype not in self._references:
            with quiet_transformers():
                if dtype == torch.float32:
                    self._references[dtype] = _load_reference(self)
                else:
                    fp32 = self.reference(torch.float32)
                    self._references[dtype] = copy.deepcopy(fp32).to(dtype).eval()
        return self._references[dtype]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or advice from transformers while the suite drives it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def tiny_model_under_test(architecture: str, directory: pathlib.Path, seed: int) -> ModelUnderTest:
    """Build and save the tiny checkpoint of ``architecture`` (an HF class name) in
    ``directory``."""
    with quiet_transformers():
        save_tiny_hf_checkpoint(
            directory, model_type_of(architecture), seed=seed % 2**31, logit_scale=TINY_LOGIT_SCALE
        )
    gen = torch.Generator().manual_seed(seed % 2**31)

    def ids(n: int) -> list[int]:
        return torch.randint(3, TINY_VOCAB, (n,), generator=gen).tolist()

    sequences = [ids(n) for n in (96, 64, 33, 17)]
    prompts = [ids(n) for n in (7, 22, 1, 35)]
    shared = ids(35)
    audit_prompts = [
        *prompts,
        [*shared, *ids(3)],
        [*shared, *ids(2)],
        shared,
        *[ids(20 + i) for i in range(5)],
    ]
    return ModelUnderTest(
        architecture, architecture, directory, "tiny", sequences, prompts, audit_prompts
    )


def real_model_under_test(
    path: pathlib.Path, spec: RealModel = REAL_MODELS["smollm2"]
) -> ModelUnderTest:
    """A real model from its checkpoint (``spec`` gives its row name, text and prompts; any
    other checkpoint is tested on the demo model's)."""
    from llm_core.loaders import open_checkpoint

    checkpoint = open_checkpoint(path)
    tokenizer = checkpoint.load_tokenizer()
    text_ids = list(tokenizer.encode(spec.text))
    prompts = [list(tokenizer.encode(p)) for p in spec.prompts]
    model = ModelUnderTest(spec.name, checkpoint.architecture, path, "real", [text_ids], prompts)
    model._checkpoint = checkpoint
    return model


def kv_block_bytes(config: Any, itemsize: float, block_size: int) -> int:
    """Bytes of one KV-cache block (keys and values of every layer) for a model config."""
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(2 * config.num_hidden_layers * kv_heads * head * itemsize * block_size)


def _load_reference(model: ModelUnderTest) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    if model.kind == "tiny":
        return AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).eval()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]

    checkpoint = model.checkpoint
    with no_init_weights():  # every weight is loaded below: random init would take 20 s
        hf = AutoModelForCausalLM.from_config(checkpoint.config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(dict(checkpoint.tensors()), strict=False)
    tied = bool(getattr(checkpoint.config, "tie_word_embeddings", False))
    if unexpected or [m for m in missing if not (tied and m == "lm_head.weight")]:
        raise RuntimeError(
            f"the reference does not match the checkpoint: missing {missing}, "
            f"unexpected {unexpected}"
        )
    if tied:
        hf.tie_weights()
    return hf.eval()


@torch.no_grad()
def reference_logits(model: ModelUnderTest, dtype: torch.dtype) -> list[torch.Tensor]:
    """Teacher-forced logits of the reference, one (L, V) float64 tensor per sequence."""
    hf = model.reference(dtype)
    return [hf(torch.tensor([seq])).logits[0].to(torch.float64) for seq in model.sequences]


@torch.no_grad()
def reference_greedy(
    model: ModelUnderTest, new_tokens: int, top_k: int
) -> list[tuple[list[int], list[list[int]]]]:
    """Greedy continuations of the fp32 reference: (tokens, top-k ids at each step) per prompt."""
    hf = model.reference(torch.float32)
    results = []
    for prompt in model.prompts:
        with quiet_transformers():
            out = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=-1,  # never stop early: compare every token
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = out.sequences[0, len(prompt) :].tolist()
        tops = [step[0].topk(top_k).indices.tolist() for step in out.logits]
        results.append((tokens, tops))
    return results
