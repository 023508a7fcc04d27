"""The environment fingerprint a certificate carries: what ran, where, on which code."""

from __future__ import annotations

import importlib.metadata
import pathlib
import platform
import subprocess
import sys
from typing import Any

from llm_hal import HAL_API_VERSION, Backend, BackendRecord


def package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(start: pathlib.Path | None = None) -> dict[str, Any]:
    """The commit of the checkout this package runs from: ``{"commit": sha, "dirty": bool}``,
    or ``{"commit": "unknown"}`` outside a git checkout."""
    where = start or pathlib.Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return {"commit": "unknown"}
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown"}


def fingerprint() -> dict[str, Any]:
    """Versions of everything that computes or checks, and the machine."""
    import numpy
    import torch

    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": {
            "llm-core": package_version("llm-core"),
            "torch": torch.__version__,
            "transformers": package_version("transformers"),
            "numpy": numpy.__version__,
            "pluggy": package_version("pluggy"),
        },
        "hal_api_version": HAL_API_VERSION,
        "torch_threads": torch.get_num_threads(),
        "git": git_commit(),
    }


def describe_backend(backend: Backend | None, record: BackendRecord | None) -> dict[str, Any]:
    """A backend's identity: its package and version, and the device it runs on."""
    out: dict[str, Any] = {}
    if record is not None:
        out["distribution"] = f"{record.distribution} {record.dist_version}"
        out["entry_point"] = record.entry_point
        if record.spec is not None:
            out["version"] = record.spec.version
            out["api_version"] = record.spec.api_version
        availability = record.availability()
        out["probe_devices"] = [
            {"name": d.name, "index": d.index, "total_memory": d.total_memory, **d.properties}
            for d in availability.devices
        ]
    if backend is not None:
        out["class"] = f"{type(backend).__module__}.{type(backend).__qualname__}"
        out["float_dtypes"] = sorted(d.value for d in backend.float_dtypes)
        try:
            info = backend.device_info()
            out["device"] = {
                "name": info.name,
                "index": info.index,
                "total_memory": info.total_memory,
                **{k: str(v) for k, v in info.properties.items()},
            }
        except Exception as exc:  # a device query must not stop the certification
            out["device"] = {"error": f"{type(exc).__name__}: {exc}"}
        out.setdefault("device", {}).setdefault("driver", _driver(backend))
    return out


def _driver(backend: Backend) -> str:
    """The driver or runtime the backend reports, else what torch knows about its device."""
    import torch

    device = getattr(backend, "device", None)
    kind = getattr(device, "type", None)
    if kind == "cuda":
        hip = getattr(torch.version, "hip", None)
        return f"HIP {hip}" if hip else f"CUDA {torch.version.cuda}"
    if kind == "cpu":
        return f"torch {torch.__version__} CPU ({torch.backends.cpu.get_cpu_capability()})"
    return "unknown"
