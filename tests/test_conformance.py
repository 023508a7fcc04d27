"""The conformance suite's machinery: comparisons, the tolerance table, certificates (digest,
signature, coverage), NOT RUN backends, reports, the CLI and the pytest plugin.

The faulty-backend tests that show the suite catches real bugs are in
``test_conformance_faults.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import torch
from llm_conformance import (
    CertificateError,
    Conformance,
    Tolerance,
    Waiver,
    generate_keypair,
    junit,
    markdown,
    seal,
    sign,
    to_html,
    verify,
)
from llm_conformance import tolerances as suite_tolerances
from llm_conformance.compare import compare
from llm_conformance.runner import serving_dtypes
from llm_conformance.tolerances import NMSE_FLOOR, SUITE_VERSION, tolerance
from llm_core.cli import main
from llm_core_cpu import CpuBackend
from llm_hal import (
    HAL_API_VERSION,
    Availability,
    BackendRecord,
    BackendSpec,
    DType,
    get_registry,
)
from llm_hal import tolerances as hal_tolerances

SEED = 1234


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``llm-core conformance ARGS`` in this process: (exit status, stdout, stderr)."""
    status = main(["conformance", *args])
    out, err = capsys.readouterr()
    return status, out, err


# -------------------------------------------------------------------------------------------
# comparisons and the table
# -------------------------------------------------------------------------------------------


#: The op-level table is defined in llm_hal.tolerances (plugins' self-checks read it too) and
#: versioned with the suite: (SUITE_VERSION, digest of the table's numbers). A change of the
#: table is a change of the suite: bump SUITE_VERSION and update both here.
TABLE_PIN = ("1.5.0", "38b56b10884ea87b")


def _op_table_digest() -> str:
    table = {
        "classes": {
            op_class: {dt.value: dataclasses.astuple(tol) for dt, tol in row.items()}
            for op_class, row in hal_tolerances.TOLERANCES.items()
        },
        "unit_roundoff": {dt.value: u for dt, u in hal_tolerances.UNIT_ROUNDOFF.items()},
        "nmse_floor": {dt.value: f for dt, f in hal_tolerances.NMSE_FLOOR.items()},
        "bias": [hal_tolerances.BIAS_CAP, hal_tolerances.BIAS_MIN_ELEMENTS, hal_tolerances.BIAS_Z],
        "attention_kv_scale": hal_tolerances.ATTENTION_KV_SCALE,
        "sampling": [hal_tolerances.SAMPLING_TV_MAX, hal_tolerances.SAMPLING_DRAWS],
    }
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def test_the_op_table_changes_only_with_the_suite_version() -> None:
    assert (SUITE_VERSION, _op_table_digest()) == TABLE_PIN, (
        "the op-level tolerance table (llm_hal/tolerances.py) or SUITE_VERSION changed: a "
        "change of the table bumps SUITE_VERSION (llm_conformance/tolerances.py); then set "
        f"TABLE_PIN = ({SUITE_VERSION!r}, {_op_table_digest()!r})"
    )


def test_the_suite_and_the_hal_share_one_table() -> None:
    for name in hal_tolerances.__all__:
        assert getattr(suite_tolerances, name) is getattr(hal_tolerances, name), name


def test_nmse_floor_is_part_of_the_table() -> None:
    assert tolerance("elementwise", DType.BF16).nmse == NMSE_FLOOR[DType.BF16] == 2.0**-16
    assert tolerance("elementwise", DType.FP32).nmse == 1e-7
    assert tolerance("linear", DType.BF16).nmse == 5e-4  # already above the floor


def test_compare_checks_nan_parity_bounds_and_nmse() -> None:
    want = torch.tensor([1.0, 2.0, float("nan"), float("inf")], dtype=torch.float64)
    tol = tolerance("elementwise", DType.FP32)
    assert compare("x", want.float(), want, tol, DType.FP32).passed
    lost_nan = want.clone()
    lost_nan[2] = 0.0
    assert "NaN parity" in compare("x", lost_nan, want, tol, DType.FP32).detail
    flipped = want.clone()
    flipped[3] = -float("inf")
    assert "Inf parity" in compare("x", flipped, want, tol, DType.FP32).detail
    off = want.clone()
    off[0] = 1.001
    detail = compare("x", off, want, tol, DType.FP32).detail
    assert "out of bounds" in detail and "NMSE" in detail
    assert "not bit-exact" in compare("x", off, want, Tolerance(exact=True), DType.FP32).detail


def test_truncation_passes_the_bounds_but_not_the_bias_check() -> None:
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rounded = g.to(torch.bfloat16)
    truncated = (g.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    tol = tolerance("elementwise", DType.BF16)
    assert compare("x", rounded, g, tol, DType.BF16).passed
    check = compare("x", truncated, g, tol, DType.BF16)
    assert not check.passed and check.detail.startswith("rounding bias")


def test_a_row_dominated_by_one_large_element_is_not_called_biased() -> None:
    """Real Gemma 3 activations: one element near 810, the rest near 1. Rounding 809.9 to
    bf16 (808) alone leans the magnitude-weighted mean -0.35 u, yet the result is correctly
    rounded: the check asks for significance as well, and truncation of the same row, which
    the data cannot tell apart from it, is not flagged either."""
    g = torch.randn(640, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g[17] = 809.9
    rounded = compare(
        "x", g.to(torch.bfloat16), g, tolerance("elementwise", DType.BF16), DType.BF16
    )
    assert rounded.passed, rounded.detail
    assert rounded.metrics["bias_u"] < -hal_tolerances.BIAS_CAP  # the lean alone would fail
    assert abs(rounded.metrics["bias_z"]) < hal_tolerances.BIAS_Z


def test_default_dtypes_are_what_a_backend_serves_in() -> None:
    class Fp32Only(CpuBackend):
        float_dtypes = frozenset({DType.FP32})

    class PrefersBf16(CpuBackend):
        float_dtypes = frozenset({DType.FP32, DType.BF16, DType.FP16, DType.FP64})
        auto_dtype_substitutes = {DType.FP16: DType.BF16}  # noqa: RUF012

    assert serving_dtypes(Fp32Only()) == [DType.FP32]
    assert serving_dtypes(PrefersBf16()) == [DType.FP32, DType.BF16]
    with Conformance([PrefersBf16()], ["llama"], ["float16"]) as run:  # asked for: certified
        assert run.backends()[0].dtypes == [DType.FP16]


# -------------------------------------------------------------------------------------------
# a small run, shared by the certificate tests
# -------------------------------------------------------------------------------------------

WAIVER = Waiver(
    name="test-gelu-fp32",
    backend="cpu",
    op_class="elementwise",
    op="gelu",
    dtype=DType.FP32,
    tolerance=Tolerance(1e-5, 1e-5, 1e-6),
    reason="a test of how waivers are reported",
)


@pytest.fixture(scope="module")
def small_run() -> dict[str, Any]:
    with Conformance(
        ["cpu"],
        ["llama"],
        ["float32"],
        seed=SEED,
        quick=True,
        audits=False,
        ops=["gelu"],
        waivers=[WAIVER],
    ) as run:
        return run.run()


def test_a_correct_backend_is_certified(small_run: dict[str, Any]) -> None:
    (cell,) = small_run["cells"]
    assert cell["status"] == "CERTIFIED", cell["reasons"]
    assert {"embedding", "rms_norm", "linear", "paged_attention_decode", "sample"} <= set(
        cell["traced_ops"]
    )
    assert cell["metrics"]["kld_mean"] < 1e-9 and cell["greedy"]["exact_match"] == 1.0
    assert cell["reference_noise"]["reference"].startswith("transformers float64")
    assert small_run["summary"]["exit_status"] == 0


def test_the_environment_and_the_waivers_are_recorded(small_run: dict[str, Any]) -> None:
    env = small_run["environment"]
    assert env["packages"]["torch"] == torch.__version__
    assert env["git"]["commit"] != ""
    (backend,) = small_run["backends"]
    assert backend["device"]["name"] and backend["version"]
    assert small_run["waivers"][0]["name"] == "test-gelu-fp32"
    gelu = next(o for o in backend["ops"] if o["op"] == "gelu")
    assert all(c.get("waivers") == ["test-gelu-fp32"] for c in gelu["cases"])
    assert "test-gelu-fp32" in markdown(small_run) and "test-gelu-fp32" in to_html(small_run)


def test_verify_accepts_a_good_certificate(small_run: dict[str, Any]) -> None:
    lines = verify(small_run, require_complete=False)
    assert any("digest" in line for line in lines)
    assert any("not signed" in line for line in lines)


def test_verify_rejects_a_partial_run_as_a_certification(small_run: dict[str, Any]) -> None:
    with pytest.raises(CertificateError, match="mandatory set was not run"):
        verify(small_run)


def test_verify_rejects_a_tampered_certificate(small_run: dict[str, Any]) -> None:
    tampered = copy.deepcopy(small_run)
    tampered["cells"][0]["metrics"]["kld_mean"] = 0.0
    with pytest.raises(CertificateError, match="digest mismatch"):
        verify(tampered, require_complete=False)


def test_verify_rejects_a_certified_cell_whose_operator_failed(small_run: dict[str, Any]) -> None:
    forged = copy.deepcopy(small_run)
    op = next(o for o in forged["backends"][0]["ops"] if o["op"] == "rms_norm")
    op["status"] = "failed"
    seal(forged)  # a forger can recompute the digest; the content still contradicts itself
    with pytest.raises(CertificateError, match="operator rms_norm"):
        verify(forged, require_complete=False)


def test_signatures(small_run: dict[str, Any], tmp_path: pathlib.Path) -> None:
    private, public = generate_keypair(tmp_path / "vendor")
    _, other_public = generate_keypair(tmp_path / "other")
    signed = sign(copy.deepcopy(small_run), private.read_bytes())
    assert any(
        "signature valid" in line
        for line in verify(signed, public.read_bytes(), require_complete=False)
    )
    with pytest.raises(CertificateError, match="bad signature"):
        verify(signed, other_public.read_bytes(), require_complete=False)
    resealed = copy.deepcopy(signed)
    resealed["environment"]["packages"]["torch"] = "9.9.9"  # claim another environment
    resealed["integrity"]["digest"] = seal(copy.deepcopy(resealed))["integrity"]["digest"]
    with pytest.raises(CertificateError, match="bad signature"):
        verify(resealed, public.read_bytes(), require_complete=False)
    with pytest.raises(CertificateError, match="not signed"):
        verify(small_run, public.read_bytes(), require_complete=False)


def test_reports_render_the_matrix(small_run: dict[str, Any]) -> None:
    text = markdown(small_run)
    assert "| LlamaForCausalLM | ✅ CERTIFIED |" in text
    page = to_html(small_run)
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    suite = ET.fromstring(junit(small_run)).find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert int(suite.get("tests", "0")) > 1


# -------------------------------------------------------------------------------------------
# unavailable backends, the CLI, pytest
# -------------------------------------------------------------------------------------------


def test_an_unavailable_backend_is_not_run_and_never_certified() -> None:
    with Conformance(["nosuchbackend"], ["llama"], ["float32", "bfloat16"], seed=SEED) as run:
        certificate = run.run()
    assert [c["status"] for c in certificate["cells"]] == ["NOT RUN", "NOT RUN"]
    assert "no such backend is installed" in certificate["cells"][0]["reasons"][0]
    assert certificate["backends"][0]["status"] == "NOT RUN"
    assert certificate["summary"]["exit_status"] == 2
    with pytest.raises(CertificateError, match="no backend ran"):
        verify(certificate)


def test_a_registered_backend_without_its_device_is_not_run_with_the_probes_reason() -> None:
    registry = get_registry()
    spec = BackendSpec(
        name="gpu-test",
        version="0.0",
        api_version=HAL_API_VERSION,
        priority=-100,
        probe=lambda: Availability.no("no GPU device: nvidia-smi found none"),
        factory=lambda _config: CpuBackend(),
    )
    registry.records["gpu-test"] = BackendRecord("gpu-test", "tests", "tests", "0.0", spec)
    try:
        with Conformance(["gpu-test"], ["qwen3"], ["bfloat16"], seed=SEED) as run:
            certificate = run.run()
    finally:
        registry.records.pop("gpu-test")
    (cell,) = certificate["cells"]
    assert cell["status"] == "NOT RUN" and not cell["ran"]
    assert cell["reasons"] == ["backend gpu-test unavailable: no GPU device: nvidia-smi found none"]
    assert "nvidia-smi" in markdown(certificate)


def test_cli_runs_writes_reports_and_verifies(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run_cli(
        capsys,
        "--backend",
        "nosuchbackend",
        "--model",
        "qwen2",
        "--dtype",
        "float32",
        "--report",
        str(tmp_path),
        "-q",
    )
    assert status == 2
    assert "NOT RUN" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "conformance-junit.xml",
        "conformance.html",
        "conformance.json",
        "conformance.md",
    ]
    status, out, _ = run_cli(
        capsys, "verify", str(tmp_path / "conformance.json"), "--allow-partial"
    )
    assert status == 0 and "digest" in out
    document = json.loads((tmp_path / "conformance.json").read_text())
    document["cells"][0]["status"] = "CERTIFIED"
    (tmp_path / "forged.json").write_text(json.dumps(document))
    status, _, err = run_cli(capsys, "verify", str(tmp_path / "forged.json"), "--allow-partial")
    assert status == 1 and "digest mismatch" in err


def test_cli_signs_with_a_generated_key(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(capsys, "keygen", str(tmp_path / "keys"))[0] == 0
    key, pub = tmp_path / "keys" / "conformance.key", tmp_path / "keys" / "conformance.pub"
    assert key.stat().st_mode & 0o777 == 0o600
    run_cli(
        capsys,
        "--backend",
        "nosuchbackend",
        "--model",
        "llama",
        "--dtype",
        "float32",
        "--report",
        str(tmp_path),
        "--sign-key",
        str(key),
        "-q",
    )
    status, out, _ = run_cli(
        capsys, "verify", str(tmp_path / "conformance.json"), "--key", str(pub), "--allow-partial"
    )
    assert status == 0 and "Ed25519 signature valid" in out


def test_cli_replays_one_case(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(
        capsys,
        "replay",
        "--backend",
        "cpu",
        "--op",
        "rms_norm",
        "--case",
        "13",
        "--dtype",
        "bfloat16",
        "--seed",
        str(SEED),
    )
    assert status == 0, out
    assert "rms_norm case 13 in bfloat16: PASSED" in out
    assert "out= guard: ok" in out


def _has_entry_point() -> bool:
    return any(
        ep.value.startswith("llm_conformance")
        for ep in importlib.metadata.entry_points(group="pytest11")
    )


def test_pytest_plugin(tmp_path: pathlib.Path) -> None:
    plugin = [] if _has_entry_point() else ["-p", "llm_conformance.pytest_plugin"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *plugin,
            "--pyargs",
            "llm_conformance",
            "--backend",
            "cpu",
            "--backend",
            "nosuchbackend",
            "--conformance-dtype",
            "float32",
            "--conformance-model",
            "llama",
            "--conformance-quick",
            "-k",
            "rms_norm and not gemma_rms_norm",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed, 1 skipped" in done.stdout
    assert "backend nosuchbackend unavailable" in done.stdout


def test_every_hal_operation_has_a_conformance_check() -> None:
    from llm_conformance.cases import MEMORY_OPS, specs
    from llm_hal import OPS

    assert set(specs()) == set(MEMORY_OPS) | set(OPS)
