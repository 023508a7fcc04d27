"""Model checkpoints on disk: Hugging Face safetensors directories and GGUF files.

``open_checkpoint(path)`` returns a ``Checkpoint`` with the model's transformers config, its
weights under Hugging Face names and its tokenizer; ``open_checkpoint(None)`` opens the
built-in demo model (SmolLM2-135M-Instruct, see ``default_model_path``), and
``open_checkpoint("gemma3-270m")`` a built-in model by name (``BUILTIN_MODELS``).
"""

from llm_core.loaders.checkpoint import Checkpoint, CheckpointError
from llm_core.loaders.default_model import (
    BUILTIN_MODELS,
    builtin_model_path,
    default_model_path,
)
from llm_core.loaders.opener import open_checkpoint

__all__ = [
    "BUILTIN_MODELS",
    "Checkpoint",
    "CheckpointError",
    "builtin_model_path",
    "default_model_path",
    "open_checkpoint",
]
