"""``llm-core conformance diff``: the first operator where two backends part, named right.

Each faulty backend below is the correct CPU backend with one planted fault of the kind a
kernel author makes: the wrong rotary pairing in one layer, keys and values written to the
neighbouring slot of one layer's cache, a decode GEMV that accumulates in bfloat16. The diff
must name the operator, the layer and the side that is wrong, every time; two correct backends
must show no divergence; and a replay bundle must reproduce the fault in another process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from llm_conformance.call_record import SKETCH
from llm_conformance.diff import Diff
from llm_conformance.replay import explain_bundle, replay_bundle
from llm_core.cli import main
from llm_core_cpu import CpuBackend
from llm_hal import (
    HAL_API_VERSION,
    AttentionMetadata,
    Availability,
    BackendRecord,
    BackendSpec,
    DType,
    LinearWeight,
    QuantScheme,
    get_registry,
)

SEED = 1234
LAYERS = 2  # the tiny checkpoints' depth


class RopePairingInOneLayer(CpuBackend):
    """Rotates layer ``fault_layer`` GPT-J style (pairs 2i, 2i+1) where the model asks for
    neox (i, i + R/2). The layer is the rotary call's number modulo ``layers``."""

    name: ClassVar[str] = "faulty-rope"

    def __init__(self, layers: int = LAYERS, fault_layer: int = 1):
        super().__init__()
        self.layers, self.fault_layer, self.calls = layers, fault_layer, 0

    def rotary_embedding(self, positions, q, k, cos_sin_cache, head_size, is_neox_style):
        layer = self.calls % self.layers
        self.calls += 1
        neox = is_neox_style != (layer == self.fault_layer)
        return super().rotary_embedding(positions, q, k, cos_sin_cache, head_size, neox)


class KvNeighbourSlot(CpuBackend):
    """Writes the keys and values of layer ``fault_layer`` one slot past their own (the
    layer's cache is the one allocated in that place)."""

    name: ClassVar[str] = "faulty-kv-slot"

    def __init__(self, fault_layer: int = 1):
        super().__init__()
        self.fault_layer = fault_layer
        self.allocated: list[Any] = []

    def allocate_kv_cache(self, num_blocks, block_size, num_kv_heads, head_size, dtype):
        pair = super().allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype)
        self.allocated.append(pair[0])
        return pair

    def reshape_and_cache(self, key, value, key_cache, value_cache, meta):
        faulty = self.allocated[self.fault_layer : self.fault_layer + 1]
        if faulty and faulty[0] is key_cache:
            slots = meta.slot_mapping
            meta = AttentionMetadata(
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_tables,
                np.where(slots >= 0, slots + 1, -1),
                meta.block_size,
            )
        return super().reshape_and_cache(key, value, key_cache, value_cache, meta)


class LowPrecisionGemv(CpuBackend):
    """The one-token (decode) GEMV path for long rows (K >= 128) accumulates in bfloat16,
    16 products at a time: fine for a prefill, wrong for every decode step's down projection."""

    name: ClassVar[str] = "faulty-gemv"

    def linear(self, x, weight: LinearWeight, out=None):
        if x.shape[0] != 1 or weight.in_features < 128 or weight.scheme is not QuantScheme.NONE:
            return super().linear(x, weight, out)
        w, xf = weight.weight.float(), x.float()
        acc = torch.zeros((1, weight.out_features), dtype=torch.bfloat16)
        for k0 in range(0, weight.in_features, 16):
            acc = (acc.float() + xf[:, k0 : k0 + 16] @ w[:, k0 : k0 + 16].T).to(torch.bfloat16)
        y = acc.float() + (0 if weight.bias is None else weight.bias.float())
        y = y.to(x.dtype)
        return y if out is None else out.copy_(y)


def _diff(backend: Any, against: Any = "cpu", dtype: str = "float32", **kwargs: Any) -> dict:
    return Diff("llama", backend, against, dtype, seed=SEED, **kwargs).run()


# -- no divergence ------------------------------------------------------------------------------


def test_identical_backends_report_no_divergence() -> None:
    record = _diff("cpu", "cpu")
    assert record["verdict"]["diverged"] is False
    assert record["first_divergence"] is None
    assert record["tokens"]["first_difference"] is None
    streams = record["streams"]
    assert streams["candidate_calls"] == streams["against_calls"] == streams["aligned"] > 0
    assert streams["first_bitwise_difference"] is None  # the same kernels: the same bits
    assert all(c["vs_reference"]["passed"] and c["against_vs_reference"]["passed"]
               for c in record["calls"])  # fmt: skip
    assert not [c for c in record["calls"] if c.get("rerun_error")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cpu_backend_diffs_clean_against_the_reference(dtype: str) -> None:
    record = _diff("cpu", "reference", dtype)
    assert record["verdict"]["diverged"] is False, record["verdict"]["summary"]
    assert record["against"]["dtype"] == "float64"
    places = record["layers"]["places"]
    assert places == ["embedding", "layer 0", "layer 1", "head", "sampling"]
    # Every layer calls the same operators, each attributed to its own layer.
    per_layer = [
        sorted(c["op"] for c in record["calls"] if c["where"] == f"layer {i}" and c["step"] == 0)
        for i in range(LAYERS)
    ]
    assert per_layer[0] == per_layer[1] and "reshape_and_cache" in per_layer[0]


def test_a_call_record_keeps_no_tensor_beyond_its_sketch() -> None:
    diff = Diff("llama", "cpu", "cpu", seed=SEED)
    diff.run()
    assert diff.culprit is None
    recorder = diff.candidate.recorder
    assert recorder is not None
    for record in recorder.records:
        for output in record.outputs:  # loading keeps the weights' digests and statistics
            assert (output.sketch is None) == (record.where == "load")
            assert output.sketch is None or output.sketch.numel() <= SKETCH
        for summary in record.inputs:
            assert summary.sketch is None


# -- planted faults -----------------------------------------------------------------------------

FAULTS = [
    pytest.param(RopePairingInOneLayer, "rotary_embedding", 1, 0, "float32", "cpu", id="rope-fp32"),
    pytest.param(RopePairingInOneLayer, "rotary_embedding", 1, 0, "bfloat16", "reference",
                 id="rope-bf16"),
    pytest.param(KvNeighbourSlot, "reshape_and_cache", 1, 0, "float32", "reference",
                 id="kv-slot-fp32"),
    pytest.param(KvNeighbourSlot, "reshape_and_cache", 1, 0, "bfloat16", "cpu", id="kv-slot-bf16"),
    pytest.param(LowPrecisionGemv, "linear", 0, 1, "float32", "cpu", id="gemv-accumulation"),
]  # fmt: skip


@pytest.mark.parametrize(("faulty", "op", "layer", "step", "dtype", "against"), FAULTS)
def test_a_planted_fault_is_named_by_op_and_layer(
    faulty: type, op: str, layer: int, step: int, dtype: str, against: str
) -> None:
    record = _diff(faulty(), against, dtype)
    first = record["first_divergence"]
    assert record["verdict"]["diverged"], record["verdict"]["summary"]
    assert (first["op"], first["layer"], first["step"]) == (op, layer, step)
    assert first["wrong_side"] == "candidate"
    assert first["vs_reference"]["passed"] is False
    if against != "reference":  # the other backend, on the candidate's inputs, is right
        assert first["against_vs_reference"]["passed"] is True
    # Nothing before it diverged: upstream drift is never blamed on a downstream op.
    assert not [c for c in record["calls"][: first["call"]] if not c["vs_reference"]["passed"]]


def test_the_faulty_gemv_is_located_at_its_token() -> None:
    record = _diff(LowPrecisionGemv(), "cpu")
    first = record["first_divergence"]
    assert first["phase"] == "decode step 1"
    assert first["token_position"] == len(record["prompt_token_ids"])  # the first decoded token
    (weight,) = [i for i in first["inputs"] if i["name"] == "weight.weight"]
    assert weight["shape"] == [64, 128]  # the down projection, K = intermediate size


def test_the_wrong_rope_is_located_in_the_prefill_and_the_streams_part_there() -> None:
    record = _diff(RopePairingInOneLayer(), "cpu")
    first = record["first_divergence"]
    assert first["phase"] == "prefill"
    assert 0 < first["token_position"] < len(record["prompt_token_ids"])  # position 0 is exact
    assert record["layers"]["failed"]["rotary_embedding"] == ["layer 1"]
    parting = record["streams"]["first_drift_beyond_tolerance"]
    assert (parting["call"], parting["op"]) == (first["call"], "rotary_embedding")
    drift = record["layers"]["drift_nmse"]["rotary_embedding"]
    assert drift["layer 0"] == 0 and drift["layer 1"] > 1e-3


def test_the_side_that_is_wrong_is_named() -> None:
    record = _diff("cpu", RopePairingInOneLayer())
    first = record["first_divergence"]
    assert (first["op"], first["layer"]) == ("rotary_embedding", 1)
    assert first["wrong_side"] == "against" and first["wrong_backend"] == "faulty-rope"
    assert first["vs_reference"]["passed"] is True
    assert first["against_vs_reference"]["passed"] is False


# -- replay bundles -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemv_bundle(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The diverging call of the faulty GEMV, dumped, then moved elsewhere (no path in the
    bundle may point back to where it was written)."""
    diff = Diff("llama", LowPrecisionGemv(), "cpu", seed=SEED)
    diff.run()
    written = diff.dump(tmp_path_factory.mktemp("dump") / "bundle")
    assert written is not None
    moved = tmp_path_factory.mktemp("elsewhere") / "bundle"
    shutil.copytree(written, moved)
    shutil.rmtree(written)
    return moved


def test_a_bundle_is_safetensors_and_a_manifest(gemv_bundle: pathlib.Path) -> None:
    assert sorted(p.name for p in gemv_bundle.iterdir()) == ["manifest.json", "tensors.safetensors"]
    manifest = json.loads((gemv_bundle / "manifest.json").read_text())
    assert manifest["op"] == "linear" and manifest["context"]["layer"] == 0
    assert manifest["backend"]["backend"] == "faulty-gemv"
    assert manifest["environment"]["packages"]["torch"] == torch.__version__
    assert set(manifest["outputs"]) == {"candidate", "reference", "against"}
    assert manifest["comparison"]["candidate_vs_reference"]["passed"] is False


def test_a_bundle_reproduces_the_fault_and_passes_on_a_correct_backend(
    gemv_bundle: pathlib.Path,
) -> None:
    faulty = replay_bundle(gemv_bundle, LowPrecisionGemv())
    assert faulty.failed
    assert faulty.same_as_recorded() == (True, 0.0)
    assert "reproduced" in explain_bundle(faulty)
    correct = replay_bundle(gemv_bundle, CpuBackend())
    assert not correct.failed
    assert "does not reproduce" in explain_bundle(correct)


def test_a_bundle_reproduces_in_a_fresh_process(gemv_bundle: pathlib.Path) -> None:
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]);"
        "from test_conformance_diff import LowPrecisionGemv;"
        "from llm_conformance.replay import replay_bundle, explain_bundle;"
        "r = replay_bundle(sys.argv[1], LowPrecisionGemv()); print(explain_bundle(r));"
        "sys.exit(1 if r.failed else 0)"
    )
    tests = str(pathlib.Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", script, str(gemv_bundle), tests],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": tests},
    )
    assert done.returncode == 1, done.stderr
    assert "bit-identical to the recorded candidate's" in done.stdout


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faulty backends installed in the process's registry, as plugins would be."""
    for cls in (RopePairingInOneLayer, LowPrecisionGemv):
        spec = BackendSpec(
            name=cls.name,
            version="0.0",
            api_version=HAL_API_VERSION,
            priority=-100,
            probe=Availability.yes,
            factory=_factory(cls),
        )
        record = BackendRecord(cls.name, "tests", "tests", "0.0", spec)
        monkeypatch.setitem(get_registry().records, cls.name, record)


def _factory(cls: type[CpuBackend]) -> Callable[[Any], CpuBackend]:
    return lambda _config: cls()


def test_the_cli_reports_and_dumps_a_divergence(
    registered: None,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status = main(
        ["conformance", "diff", "--model", "llama", "--backend", "faulty-rope", "--against",
         "cpu", "--report", str(tmp_path), "--dump", str(tmp_path / "bundle"), "--keep-op",
         "rotary_embedding@0", "-q"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 1
    assert "DIVERGENCE: rotary_embedding in layer 1, prefill" in out
    assert "=> faulty-rope is wrong" in out
    record = json.loads((tmp_path / "diff.json").read_text())
    assert record["first_divergence"]["op"] == "rotary_embedding"
    page = (tmp_path / "diff.html").read_text()
    assert page.count("<svg") == 2 and "<polyline" in page and "layer 1" in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    kept = sorted((tmp_path / "bundle" / "kept").iterdir())
    assert kept and all("rotary_embedding-layer0" in p.name for p in kept)
    assert (tmp_path / "bundle" / "manifest.json").is_file()

    # This test backend picks its faulty layer by counting calls; a replay makes one call,
    # so on the "other machine" the same kernel is installed wrong on every call.
    spec = get_registry().records["faulty-rope"].spec
    assert spec is not None
    always = dataclasses.replace(spec, factory=lambda _config: RopePairingInOneLayer(1, 0))
    monkeypatch.setitem(
        get_registry().records,
        "faulty-rope",
        BackendRecord("faulty-rope", "tests", "tests", "0.0", always),
    )
    assert main(["conformance", "replay", str(tmp_path / "bundle")]) == 1  # recorded backend
    assert "reproduced" in capsys.readouterr().out
    assert main(["conformance", "replay", str(tmp_path / "bundle"), "--backend", "cpu"]) == 0
    assert "does not reproduce on cpu" in capsys.readouterr().out


def test_the_cli_reports_no_divergence_with_status_0(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["conformance", "diff", "--model", "llama", "--backend", "cpu", "-q"])
    assert status == 0
    assert "NO DIVERGENCE" in capsys.readouterr().out


def test_the_cli_says_why_a_diff_cannot_run(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["conformance", "diff", "--model", "llama", "--backend", "no-such", "-q"])
    assert status == 2
    assert "cannot run" in capsys.readouterr().err


def test_replay_asks_for_a_bundle_or_a_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "replay", "--backend", "cpu"]) == 1
    assert "--op, --case" in capsys.readouterr().err
    assert main(["conformance", "replay", "--backend", "cpu", "--op", "add", "--case", "0"]) == 0


def test_opencl_diffs_clean_against_the_cpu() -> None:
    record = get_registry().records.get("opencl")
    if record is None or not record.availability().available:
        pytest.skip("the OpenCL backend is not available here")
    result = _diff("opencl", "cpu")
    assert result["verdict"]["diverged"] is False, result["verdict"]["summary"]
    assert result["streams"]["aligned"] == result["streams"]["candidate_calls"]


class Fp32Only(CpuBackend):
    name: ClassVar[str] = "fp32-only"
    float_dtypes: ClassVar[frozenset[DType]] = frozenset({DType.FP32})


def test_a_dtype_the_backend_lacks_is_refused() -> None:
    with pytest.raises(RuntimeError, match="fp32-only does not compute in bfloat16"):
        Diff("llama", Fp32Only(), "cpu", DType.BF16)
