"""HFBaseline: the same prompts through Hugging Face transformers' ``generate`` (greedy, same
weights, same dtype), for the ``--baseline hf`` ratio.

transformers has no continuous batching: requests run in static waves of ``concurrency``
prompts (left-padded when their lengths differ), each wave generating exactly ``output_len``
tokens. A streamer timestamps every generation step, so TTFT, TPOT and ITL are measured the
same way as for llm-core. Request rates are not modelled: a wave starts when the previous ends.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import torch

from llm_core.benchmarks.errors import BaselineUnavailableError
from llm_core.benchmarks.timeline import RequestTimeline
from llm_core.benchmarks.waves import WaveBaseline


class _StepClock:
    """A transformers streamer that notes when each generation step's tokens exist."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return None


class HFBaseline(WaveBaseline):
    name = "transformers"

    def __init__(self, checkpoint: str | pathlib.Path, dtype: torch.dtype):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM

        path = pathlib.Path(checkpoint)
        try:
            if path.suffix == ".gguf":
                model = self._dense_from_gguf(path, dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        except ImportError as exc:
            raise BaselineUnavailableError(f"--baseline hf cannot load {path}: {exc}") from exc
        self.model = model.eval()
        import transformers

        self.description = f"transformers {transformers.__version__} generate(), {dtype}"
        cfg = self.model.generation_config
        eos = cfg.eos_token_id
        self.pad_id = int(
            cfg.pad_token_id
            if cfg.pad_token_id is not None
            else (eos[0] if isinstance(eos, list) else eos or 0)
        )

    @staticmethod
    def _dense_from_gguf(path: pathlib.Path, dtype: torch.dtype) -> Any:
        """The HF model with the GGUF's weights dequantized into ordinary dense tensors of
        ``dtype``, exactly the numbers llm-core computes with. (transformers' own GGUF loading
        may keep weights packed and run them through quantized kernels: another model.)"""
        from transformers import AutoModelForCausalLM

        from llm_core.loaders.opener import open_checkpoint

        checkpoint = open_checkpoint(str(path))
        model = AutoModelForCausalLM.from_config(checkpoint.config, dtype=dtype)
        state = {name: t.to(dtype) for name, t in checkpoint.tensors()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise BaselineUnavailableError(
                f"{path.name}: weights do not match the HF model (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        model.tie_weights()
        return model

    def _run_wave(
        self, prompts: list[list[int]], output_len: int, arrival: float
    ) -> list[RequestTimeline]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        clock = _StepClock()
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=self.pad_id,
                streamer=clock,
            )
        timelines = []
        for p in prompts:
            t = RequestTimeline(len(p), arrival)
            for when in clock.times:
                t.add_tokens(1, when)
            timelines.append(t)
        return timelines
