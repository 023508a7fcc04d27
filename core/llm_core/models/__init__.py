"""Model families, one small file each, and the architecture registry."""

from llm_core.models.base import CausalLM, ForwardBatch
from llm_core.models.registry import model_class_for, supported_architectures

__all__ = ["CausalLM", "ForwardBatch", "model_class_for", "supported_architectures"]
