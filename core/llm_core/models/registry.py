"""Which class serves which Hugging Face architecture name."""

from __future__ import annotations

from typing import Any

from llm_core.models.base import CausalLM
from llm_core.models.gemma2 import Gemma2ForCausalLM
from llm_core.models.gemma3 import Gemma3ForCausalLM
from llm_core.models.glm4 import Glm4ForCausalLM
from llm_core.models.llama import LlamaForCausalLM
from llm_core.models.mistral import MistralForCausalLM
from llm_core.models.phi3 import Phi3ForCausalLM
from llm_core.models.qwen2 import Qwen2ForCausalLM
from llm_core.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: tuple[type[CausalLM], ...] = (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Phi3ForCausalLM,
    Glm4ForCausalLM,
)

ARCHITECTURES: dict[str, type[CausalLM]] = {
    arch: cls for cls in MODEL_CLASSES for arch in cls.architectures
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_class_for(config: Any) -> type[CausalLM]:
    """The class for ``config.architectures``, or a clear error listing what is supported."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    shown = ", ".join(names) or "none declared in config.json"
    raise ValueError(
        f"unsupported model architecture ({shown}); llm-core supports: "
        f"{', '.join(supported_architectures())}"
    )
