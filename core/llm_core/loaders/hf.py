"""Hugging Face checkpoints: a directory with config.json, safetensors weights and a tokenizer.

Before transformers or safetensors read anything, config.json is parsed and its required fields
checked, every safetensors header is checked against its file (``SafetensorsHeader``), and the
tensors' shapes against the config (``check_decoder_tensors``); whatever the libraries still
raise becomes a ``CheckpointError`` naming the file and the field or tensor. Weights holding NaN
or infinity are refused as they are read (``check_finite``).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from llm_core.loaders.checkpoint import (
    DECODER_MODEL_TYPES,
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    check_decoder_tensors,
    check_finite,
    describe,
    pickle_refusal_message,
)
from llm_core.loaders.safetensors_header import SafetensorsHeader

#: config.json fields every decoder of ``DECODER_MODEL_TYPES`` needs: transformers would fill a
#: missing one with the default of its config class (hidden_size=4096 ...), which then fails far
#: from the cause.
REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
#: Fields that must be positive integers when present and not null.
POSITIVE_CONFIG_FIELDS = (
    "intermediate_size",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)
#: Files that hold a tokenizer's vocabulary, in one format or another.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)
#: JSON files a tokenizer is read from; one that does not parse is named.
TOKENIZER_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
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
        self.weight_files, index = _weight_files(path)
        self._headers = [SafetensorsHeader.read(file) for file in self.weight_files]
        self._names_by_file = _tensor_names_by_file(self._headers, index)
        shapes = {name: e.shape for h in self._headers for name, e in h.tensors.items()}
        files = {name: h.path.name for h in self._headers for name in h.tensors}
        check_decoder_tensors(
            path,
            self.config,
            shapes,
            source="config.json",
            stored_name=lambda name: f"{name} (in {files[name]})" if name in files else name,
        )

    def tensor_names(self) -> list[str]:
        return [name for names in self._names_by_file.values() for name in names]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for file, names in self._names_by_file.items():
            with _open_safetensors(file) as f:
                for name in names:
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as exc:  # safetensors' errors name neither file nor tensor
                        raise CheckpointError(
                            f"{file}: tensor {name} cannot be read ({describe(exc)})."
                        ) from exc
                    check_finite(file, name, tensor)
                    yield name, tensor

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            return AutoTokenizer.from_pretrained(
                str(self.path), local_files_only=True, trust_remote_code=self.trust_remote_code
            )
        except Exception as exc:  # transformers and tokenizers raise many types on bad files
            raise CheckpointError(_tokenizer_failure(self.path, exc)) from exc


def _load_config(path: pathlib.Path, trust_remote_code: bool) -> PretrainedConfig:
    file = path / "config.json"
    _check_config_json(file)
    try:
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # transformers raises ValueError, KeyError, TypeError, OSError ...
        hint = "" if trust_remote_code else " If it needs custom code, pass trust_remote_code."
        raise CheckpointError(
            f"{file}: transformers cannot read it ({describe(exc)}).{hint}"
        ) from exc
    if not config.architectures:
        # Older configs omit it; the causal-LM class of the model type is the one meant.
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if causal_lm is None:
            raise CheckpointError(
                f"{file} has no 'architectures' entry and model_type "
                f"{config.model_type!r} has no causal-LM class in transformers: add "
                '"architectures": ["<Name>ForCausalLM"] to config.json.'
            )
        config.architectures = [causal_lm]
    return config


def _check_config_json(file: pathlib.Path) -> None:
    """Parse config.json and check the fields a decoder cannot do without."""
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read it ({describe(exc)}).") from exc
    if not isinstance(fields, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(fields).__name__}, not an object.")

    model_type = fields.get("model_type")
    if "model_type" not in fields:
        raise CheckpointError(
            f"{file}: required field 'model_type' is missing (for example \"llama\" or "
            '"qwen2"): the file is incomplete or corrupt.'
        )
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(
            f"{file}: field 'model_type' is {model_type!r}, expected a model type name such as "
            '"llama".'
        )
    architectures = fields.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise CheckpointError(
            f"{file}: field 'architectures' is {architectures!r}, expected a list of class "
            'names such as ["LlamaForCausalLM"].'
        )
    # Multimodal configs keep the language model's sizes in text_config.
    text = fields.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in fields:
        sizes, prefix = text, "text_config."
    else:
        sizes, prefix = fields, ""
    # Other model types may name their sizes differently (n_embd, num_layers ...): the model
    # registry refuses them with the list of what is supported.
    required = REQUIRED_CONFIG_FIELDS if model_type in DECODER_MODEL_TYPES else ()
    for field in required:
        if field not in sizes:
            raise CheckpointError(
                f"{file}: required field '{prefix}{field}' is missing: the file is incomplete "
                "or corrupt."
            )
    for field in REQUIRED_CONFIG_FIELDS + POSITIVE_CONFIG_FIELDS:
        value = sizes.get(field)
        if value is None and field not in required:
            continue  # absent or null: the config class's default (head_dim: hidden / heads)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(
                f"{file}: field '{prefix}{field}' is {value!r}, expected a positive integer."
            )
    eps = sizes.get("rms_norm_eps")
    if "rms_norm_eps" in sizes and (
        not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < 1
    ):
        raise CheckpointError(
            f"{file}: field '{prefix}rms_norm_eps' is {eps!r}, expected a small positive number."
        )


def _weight_files(path: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str] | None]:
    """The safetensors files, and the index's tensor -> file map when the weights are sharded."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        preferred = path / "model.safetensors.index.json"
        index = preferred if preferred in indexes else indexes[0]
        weight_map = _read_index(index)
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shards that are missing: {', '.join(missing)}. "
                "Download the complete checkpoint."
            )
        return files, weight_map

    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    pickles += sorted(p.name for p in path.glob("*.bin.index.json"))
    if pickles:
        raise CheckpointError(
            pickle_refusal_message(path) + f" Found: {', '.join(sorted(set(pickles)))}."
        )
    raise CheckpointError(
        f"{path} has config.json but no *.safetensors weights: download the weights too."
    )


def _read_index(index: pathlib.Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{index}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}."
        ) from exc
    except (OSError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index}: not a safetensors index ({describe(exc)}); it needs a 'weight_map' "
            "object of tensor name -> shard file."
        ) from exc
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) and "/" not in v and v.endswith(".safetensors")
        for v in weight_map.values()
    ):
        raise CheckpointError(
            f"{index}: field 'weight_map' must map tensor names to *.safetensors file names "
            "in the same directory."
        )
    return weight_map


def _open_safetensors(file: pathlib.Path) -> Any:
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({describe(exc)})."
        ) from exc


def _tensor_names_by_file(
    headers: list[SafetensorsHeader], weight_map: dict[str, str] | None
) -> dict[pathlib.Path, list[str]]:
    names_by_file: dict[pathlib.Path, list[str]] = {}
    seen: dict[str, pathlib.Path] = {}
    for header in headers:
        file = header.path
        with _open_safetensors(file) as f:
            names = list(f.keys())
        for name in names:
            if name in seen:
                raise CheckpointError(
                    f"{file.parent}: tensor {name} is stored twice, in {seen[name].name} and "
                    f"{file.name}."
                )
            seen[name] = file
        names_by_file[file] = names
    for name, shard in (weight_map or {}).items():
        if name not in seen or seen[name].name != shard:
            raise CheckpointError(
                f"{headers[0].path.parent}: the safetensors index maps tensor {name} to "
                f"{shard}, which does not hold it: the index or the shard is corrupt."
            )
    return names_by_file


def _tokenizer_failure(path: pathlib.Path, exc: Exception) -> str:
    """Why the tokenizer did not load: a named file that is not JSON, no vocabulary, or exc."""
    for name in TOKENIZER_JSON_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as bad:
            return (
                f"{file}: cannot load the tokenizer: invalid JSON at line {bad.lineno}, column "
                f"{bad.colno}: {bad.msg}. Save the tokenizer again."
            )
        except (OSError, UnicodeDecodeError) as bad:
            return f"{file}: cannot load the tokenizer ({describe(bad)})."
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return (
            f"{path}: cannot load the tokenizer: none of its vocabulary files "
            f"({', '.join(TOKENIZER_FILES)}) is there. Save the tokenizer with the model "
            "(tokenizer.save_pretrained(DIR))."
        )
    return (
        f"{path}: cannot load the tokenizer ({describe(exc)}). The directory needs the "
        "tokenizer files saved with it (tokenizer.json and tokenizer_config.json, or the "
        "files of a slow tokenizer)."
    )
