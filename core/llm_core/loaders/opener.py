"""``open_checkpoint``: open a model on disk with the loader of its format.

The format modules (and the libraries they need) are imported only for the format in use.
"""

from __future__ import annotations

import os
import pathlib

from llm_core.loaders.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    CheckpointError,
    pickle_refusal_message,
)
from llm_core.loaders.default_model import (
    BUILTIN_MODELS,
    builtin_model,
    builtin_model_path,
    default_model_path,
)


def open_checkpoint(
    model: str | os.PathLike[str] | None, *, trust_remote_code: bool = False
) -> Checkpoint:
    """Open a local checkpoint.

    Args:
        model: a directory with ``config.json``, ``*.safetensors`` (one file, or shards with
            ``model.safetensors.index.json``) and tokenizer files; a ``.gguf`` file; a directory
            holding exactly one ``.gguf`` file and no ``config.json``; the name of a built-in
            model (``smollm2``, ``gemma3-270m``: fetched on first use, see
            ``builtin_model_path``), used only when no file or directory of that name exists;
            or ``None`` for the built-in default model (SmolLM2-135M-Instruct, see
            ``default_model_path``).
        trust_remote_code: let transformers run Python code shipped with the checkpoint for
            its config and tokenizer. Off by default; weights never run code either way.

    Raises:
        CheckpointError: the path does not exist, is not a checkpoint this loader reads, holds
            only pickle weights, or names an unsupported GGUF architecture; a built-in model
            cannot be fetched.
    """
    if model is None:
        model = default_model_path()

    path = pathlib.Path(model).expanduser()
    if not path.exists() and builtin_model(str(model)) is not None:
        path = builtin_model_path(str(model))  # a path on disk wins over a built-in name
    if not path.exists():
        raise CheckpointError(
            f"{str(model)!r} does not exist. llm-core loads local checkpoints only and never "
            "downloads from a model hub: download the model first (for example with "
            "`huggingface-cli download ORG/NAME --local-dir DIR`) and pass that directory, "
            "or pass a .gguf file, or the name of a built-in model "
            f"({', '.join(BUILTIN_MODELS)})."
        )

    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from llm_core.loaders.gguf_loader import GGUFCheckpoint

            return GGUFCheckpoint(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(pickle_refusal_message(path))
        raise CheckpointError(
            f"{path} is a file but not a .gguf file: pass a .gguf file or a Hugging Face "
            "checkpoint directory (config.json + *.safetensors)."
        )

    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            from llm_core.loaders.gguf_loader import GGUFCheckpoint

            return GGUFCheckpoint(ggufs[0])
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise CheckpointError(
                f"{path} holds several .gguf files ({names}): pass the path of the one to load."
            )
        raise CheckpointError(
            f"{path} has no config.json: a Hugging Face checkpoint directory needs config.json "
            "next to its *.safetensors and tokenizer files (or pass a .gguf file)."
        )

    from llm_core.loaders.hf import HFCheckpoint

    return HFCheckpoint(path, trust_remote_code=trust_remote_code)
