"""Can the Ascend backend run here? Each way it cannot becomes one reason that says what to do.

The checks run cheapest first and stop at the first failure: torch-npu installed, torch-npu
built for the installed torch, the CANN toolkit's libraries present and visible to the loader,
torch-npu importable, at least one NPU visible. Only the last two import torch-npu. Each check
is a function of what it looks at, so the tests can give it any environment.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata as md
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_hal import Availability, DeviceInfo
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from llm_core_ascend.ops import TORCH_NPU_VERSION, import_torch_npu

#: Where ``set_env.sh`` of the CANN toolkit points; either one names the toolkit's home.
CANN_HOME_VARS = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
#: The toolkit's home when the CANN installer's default prefix was kept.
CANN_DEFAULT_HOME = Path("/usr/local/Ascend/ascend-toolkit/latest")
#: torch-npu links against HCCL (collectives); without it ``import torch_npu`` fails.
HCCL_LIBRARY = "libhccl.so"
SET_ENV_HINT = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
INSTALL_HINT = 'pip install "llm-core[ascend]"'


@dataclass(frozen=True, slots=True)
class Environment:
    """What the static checks look at."""

    torch_version: str
    torch_npu_version: str | None  # the installed distribution's version; None: not installed
    torch_npu_requires: tuple[str, ...]  # its requirements, e.g. ("torch==2.13.0.*", "numpy")
    environ: Mapping[str, str]

    @classmethod
    def current(cls) -> Environment:
        import torch

        try:
            version: str | None = md.version("torch-npu")
            requires = tuple(md.requires("torch-npu") or ())
        except md.PackageNotFoundError:
            version, requires = None, ()
        return cls(torch.__version__, version, requires, dict(os.environ))


def probe() -> Availability:
    """The backend's availability probe (``BackendSpec.probe``); never raises."""
    env = Environment.current()
    reason = static_reason(env)
    if reason:
        return Availability.no(reason)
    try:
        import_torch_npu()
    except Exception as exc:  # ImportError, OSError (a missing .so), RuntimeError: all a reason
        return Availability.no(import_reason(exc, env))
    import torch

    npu: Any = getattr(torch, "npu", None)
    count = int(npu.device_count()) if npu is not None else 0
    reason = device_reason(count, env)
    if reason:
        return Availability.no(reason)
    assert npu is not None
    cann = cann_version(cann_home(env.environ))
    devices = []
    for i in range(count):
        free, total = npu.mem_get_info(i)
        props = {"torch_npu": str(env.torch_npu_version), "free_memory": str(int(free))}
        if cann:
            props["cann"] = cann
        devices.append(DeviceInfo(i, str(npu.get_device_name(i)), int(total), props))
    return Availability.yes(devices)


# -------------------------------------------------------------------------------------------
# the checks
# -------------------------------------------------------------------------------------------


def static_reason(env: Environment) -> str:
    """Why the backend cannot run, judged without importing torch-npu; "" when nothing is
    known to be missing."""
    return (
        installed_reason(env)
        or version_reason(env)
        or cann_reason(env.environ, ctypes.util.find_library("hccl"))
    )


def installed_reason(env: Environment) -> str:
    if env.torch_npu_version is not None:
        return ""
    return (
        f"torch-npu is not installed; run `{INSTALL_HINT}` (torch-npu {TORCH_NPU_VERSION}, for "
        f"torch {TORCH_NPU_VERSION}), after installing the CANN toolkit"
    )


def version_reason(env: Environment) -> str:
    """torch-npu is built for exactly one torch release; a mismatch fails at import time."""
    required = _torch_requirement(env.torch_npu_requires)
    try:
        torch_version = Version(env.torch_version)
    except InvalidVersion:
        return ""  # a custom torch build: let the import decide
    if required is not None:
        if required.specifier.contains(torch_version, prereleases=True):
            return ""
        wanted = f"torch{required.specifier}"
    else:  # no metadata: torch-npu X.Y.Z goes with torch X.Y.Z
        try:
            npu_release = Version(str(env.torch_npu_version)).release[:3]
        except InvalidVersion:
            return ""
        if npu_release == torch_version.release[:3]:
            return ""
        wanted = "torch " + ".".join(str(x) for x in npu_release)
    return (
        f"torch-npu {env.torch_npu_version} requires {wanted}, but torch {env.torch_version} "
        f"is installed; install the torch-npu release built for this torch (torch-npu "
        f"{torch_version.base_version}), or the torch that torch-npu was built for"
    )


def _torch_requirement(requires: tuple[str, ...]) -> Requirement | None:
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.lower() == "torch" and (req.marker is None or req.marker.evaluate()):
            return req
    return None


def cann_home(environ: Mapping[str, str]) -> Path | None:
    """The CANN toolkit's home: named by set_env.sh's variables, else the default prefix."""
    for var in CANN_HOME_VARS:
        if environ.get(var):
            return Path(environ[var])
    return CANN_DEFAULT_HOME if CANN_DEFAULT_HOME.is_dir() else None


def cann_reason(environ: Mapping[str, str], loader_finds: str | None) -> str:
    """The CANN libraries torch-npu links against must exist and be visible to the dynamic
    loader (LD_LIBRARY_PATH, as set_env.sh sets it, or the ld.so cache: ``loader_finds``)."""
    on_path = [
        Path(d) / HCCL_LIBRARY
        for d in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
        if d and (Path(d) / HCCL_LIBRARY).is_file()
    ]
    if on_path or loader_finds:
        return ""
    home = cann_home(environ)
    if home is None:
        names = " and ".join(CANN_HOME_VARS)
        return (
            f"the CANN toolkit was not found ({names} are unset, {CANN_DEFAULT_HOME} does not "
            f"exist, and no {HCCL_LIBRARY} is on LD_LIBRARY_PATH); install CANN and run "
            f"`{SET_ENV_HINT}`"
        )
    in_home = home / "lib64" / HCCL_LIBRARY
    if in_home.is_file():
        return (
            f"CANN is installed at {home}, but {HCCL_LIBRARY} is not on LD_LIBRARY_PATH; run "
            f"`source {home.parent / 'set_env.sh'}` (or {SET_ENV_HINT})"
        )
    return (
        f"the CANN toolkit at {home} has no {in_home.relative_to(home)} (an incomplete or "
        f"mismatched install); reinstall the CANN toolkit and run `{SET_ENV_HINT}`"
    )


def import_reason(exc: BaseException, env: Environment) -> str:
    detail = f"{type(exc).__name__}: {exc}"
    hint = f"check that the CANN toolkit matches torch-npu {env.torch_npu_version} and run "
    hint += f"`{SET_ENV_HINT}`"
    return f"import torch_npu failed ({detail}); {hint}"


def device_reason(count: int, env: Environment) -> str:
    if count > 0:
        return ""
    visible = env.environ.get("ASCEND_RT_VISIBLE_DEVICES")
    which = f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible is not None else ""
    return (
        f"torch-npu {env.torch_npu_version} sees no NPU device{which}; check `npu-smi info`, "
        f"the Ascend driver, and the device permissions of this user"
    )


def cann_version(home: Path | None) -> str:
    """The toolkit's version from its install record, "" when it cannot be read."""
    if home is None:
        return ""
    records = [
        *sorted(home.glob("*/ascend_toolkit_install.info")),
        home / "ascend_toolkit_install.info",
    ]
    for info in records:
        try:
            for line in info.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "version":
                    return value.strip().strip('"')
        except OSError:
            continue
    return ""
