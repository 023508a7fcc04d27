"""Hugging Face checkpoints: a directory with config.json, safetensors weights and a tokenizer."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from llm_core.loaders.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    pickle_refusal_message,
)


class HFCheckpoint(Checkpoint):
    """A Hugging Face checkpoint directory, read with transformers and safetensors only.

    Weights come from ``*.safetensors`` (one file, or the shards listed in
    ``*.safetensors.index.json``), streamed one file at a time, in the dtype stored on disk
    and under the names stored on disk. Config and tokenizer are read with
    ``local_files_only=True``: nothing is downloaded.
    """

    format = "hf"

    def __init__(self, path: pathlib.Path, *, trust_remote_code: bool = False) -> None:
        self.trust_remote_code = trust_remote_code
        super().__init__(path, _load_config(path, trust_remote_code))
        self.weight_files = _weight_files(path)
        self._names_by_file = _tensor_names_by_file(self.weight_files)

    def tensor_names(self) -> list[str]:
        return [name for names in self._names_by_file.values() for name in names]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file, names in self._names_by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    yield name, f.get_tensor(name)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            return AutoTokenizer.from_pretrained(
                str(self.path), local_files_only=True, trust_remote_code=self.trust_remote_code
            )
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{self.path}: cannot load the tokenizer ({exc}). The directory needs the "
                "tokenizer files saved with it (tokenizer.json and tokenizer_config.json, or "
                "the files of a slow tokenizer)."
            ) from exc


def _load_config(path: pathlib.Path, trust_remote_code: bool) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        hint = "" if trust_remote_code else " If it needs custom code, pass trust_remote_code."
        raise CheckpointError(
            f"{path / 'config.json'}: transformers cannot read it ({exc}).{hint}"
        ) from exc
    if not config.architectures:
        # Older configs omit it; the causal-LM class of the model type is the one meant.
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if causal_lm is None:
            raise CheckpointError(
                f"{path / 'config.json'} has no 'architectures' entry and model_type "
                f"{config.model_type!r} has no causal-LM class in transformers: add "
                '"architectures": ["<Name>ForCausalLM"] to config.json.'
            )
        config.architectures = [causal_lm]
    return config


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        preferred = path / "model.safetensors.index.json"
        index = preferred if preferred in indexes else indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc!r}).") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shards that are missing: {', '.join(missing)}. "
                "Download the complete checkpoint."
            )
        return files

    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    pickles += sorted(p.name for p in path.glob("*.bin.index.json"))
    if pickles:
        raise CheckpointError(
            pickle_refusal_message(path) + f" Found: {', '.join(sorted(set(pickles)))}."
        )
    raise CheckpointError(
        f"{path} has config.json but no *.safetensors weights: download the weights too."
    )


def _tensor_names_by_file(files: list[pathlib.Path]) -> dict[pathlib.Path, list[str]]:
    names_by_file: dict[pathlib.Path, list[str]] = {}
    seen: dict[str, pathlib.Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc}).") from exc
        for name in names:
            if name in seen:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice, in {seen[name].name} and {file.name}."
                )
            seen[name] = file
        names_by_file[file] = names
    return names_by_file
