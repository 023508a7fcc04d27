"""Every config field a model family reads is honoured; every other one must keep its default.

A transformers config class carries fields for training, for other runtimes and for variants
of the architecture. A field that changes what the model computes, set to a value the family
code does not implement, would give a silently wrong model; so each family lists the fields it
honours, and any other field whose value differs from the config class's default is refused by
name. Fields that cannot change the forward pass (ids, dropout, bookkeeping) are listed here.
"""

from __future__ import annotations

from typing import Any

#: Read by the shared decoder for every family.
DECODER_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
    }
)

#: Fields that do not change the forward pass of a served model: token ids (the tokenizer and
#: engine read them), training-only dropout and initialisation, transformers' bookkeeping.
INERT_FIELDS = frozenset(
    {
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "name_or_path",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "tokenizer_class",
        "pretraining_tp",  # transformers 5 computes one matmul whatever its value
        "cache_implementation",
    }
)


def check_config_fields(config: Any, owner: str, honoured: frozenset[str]) -> None:
    """Refuse a field of ``config`` that ``owner`` does not honour and that is not at its
    config class's default. Fields transformers' class does not define are ignored, as
    transformers ignores them, except ``quantization_config``, which llm-core cannot serve yet.

    Raises:
        ValueError: naming the field, its value, and what is supported.
    """
    values = config.to_dict()
    if values.get("quantization_config"):
        method = values["quantization_config"].get("quant_method", "unknown")
        raise ValueError(
            f"{owner}: quantized checkpoints (quantization_config, quant_method={method!r}) are "
            "not supported yet; use an unquantized (bf16/fp16/fp32) checkpoint or a GGUF file"
        )
    try:
        defaults = type(config)().to_dict()
    except Exception:  # a config class that cannot be built bare checks nothing beyond this
        return
    for key, value in values.items():
        if key.startswith("_") or key in INERT_FIELDS or key in DECODER_FIELDS:
            continue
        if key in honoured or key not in defaults:
            continue
        if value != defaults[key]:
            raise ValueError(
                f"{owner}: config field {key}={value!r} is not supported (llm-core implements "
                f"only its default, {defaults[key]!r}, for this architecture); the fields it "
                f"honours beyond the common decoder ones are: {', '.join(sorted(honoured))}"
            )
