"""``llm-core new-backend NAME``: write a ready-to-install backend plugin package.

    llm-core new-backend NAME [--torch-device DEV | --host-arrays] [--output DIR]

writes ``DIR/llm-core-NAME/`` (``_`` in NAME becomes ``-``; the import package is
``llm_core_NAME``): a ``pyproject.toml`` that declares the ``llm_core.backends``
entry point, a plugin module that states the HAL API version it was written against, a
backend class, a test that runs the conformance suite on it, and a CI job that certifies it
and uploads the report. Install it with ``pip install -e "DIR/llm-core-NAME[test]"``.

``--torch-device DEV`` (the default, on ``cpu``) subclasses ``llm_hal.TorchBackend`` on the
torch device type DEV: every operator works at once, and a vendor replaces them one by one.
``--host-arrays`` writes a backend whose tensors are numpy arrays, the skeleton of a backend
that is not built on torch: the methods every backend must implement, a few operators, and
the rest reported unsupported. See docs/vendor-guide.md and docs/hal.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import string
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from llm_hal import HAL_API_VERSION

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: Backend names of this project's own distributions (llm-core-NAME): a generated package
#: with one of them would clash with the real one when both are installed.
RESERVED_NAMES = frozenset({"cpu", "opencl", "cuda", "rocm", "ascend", "triton", "conformance"})

_NAME = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")
_DEVICE_TYPE = re.compile(r"[a-z][a-z0-9_]*")

#: Template folders, in order: each variant adds its files to the common ones.
VARIANTS = {"torch": ("common", "torch"), "host": ("common", "host")}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``new-backend`` command on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "new-backend",
        help="write a new backend plugin package, ready to install and certify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", help="backend name: a lowercase identifier (letters, digits, single '_')"
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--torch-device",
        metavar="DEV",
        help="subclass the reference TorchBackend on this torch device type "
        "(cpu, xpu, npu, privateuseone, ...; default cpu)",
    )
    kind.add_argument(
        "--host-arrays",
        action="store_true",
        help="a backend whose tensors are numpy arrays: the skeleton of a non-torch backend",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="where the package folder llm-core-NAME is written (default: here)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.host_arrays:
        plan = Plan.host_arrays(args.name)
    else:
        plan = Plan.torch(args.name, args.torch_device or "cpu")
    try:
        root = write_package(plan, args.output)
    except FileExistsError as exc:
        print(f"llm-core: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {root}")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(root)}")
    print(
        f"\nnext:\n"
        f'  pip install -e "{root}[test]"\n'
        f"  llm-core plugins --all-ops\n"
        f"  pytest {root / 'tests'}\n"
        f"  llm-core conformance --backend {plan.name} --report conformance-report"
    )
    return 0


# -------------------------------------------------------------------------------------------
# what is written
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """A package to write: its names, its variant and the values its templates need."""

    name: str  # the backend name: entry point, BackendSpec.name, --backend NAME
    variant: str  # "torch" or "host"
    torch_device: str = ""

    @classmethod
    def torch(cls, name: str, device: str) -> Plan:
        check_name(name)
        if not _DEVICE_TYPE.fullmatch(device):
            raise ValueError(
                f"--torch-device {device!r} is not a torch device type: give the type alone "
                "(cpu, xpu, npu, ...); the device index comes from the engine at run time"
            )
        return cls(name, "torch", device)

    @classmethod
    def host_arrays(cls, name: str) -> Plan:
        check_name(name)
        return cls(name, "host")

    @property
    def package(self) -> str:
        return f"llm_core_{self.name}"

    @property
    def distribution(self) -> str:
        return f"llm-core-{self.name.replace('_', '-')}"

    @property
    def class_name(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_")) + "Backend"

    def values(self) -> dict[str, str]:
        """What the templates' ``$placeholders`` stand for."""
        return {
            "name": self.name,
            "package": self.package,
            "distribution": self.distribution,
            "class_name": self.class_name,
            "torch_device": self.torch_device,
            "hal_version": HAL_API_VERSION,
            "core_requirement": f"llm-core{compatible_range(core_version())}",
            "conformance_requirement": f"llm-core-conformance{compatible_range(core_version())}",
        }


def check_name(name: str) -> None:
    """Refuse a backend name that is not a lowercase identifier, or that this project uses."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"backend name {name!r} must be a lowercase identifier: a letter, then letters, "
            "digits and single underscores (e.g. acme or acme_npu)"
        )
    if name in RESERVED_NAMES:
        raise ValueError(
            f"backend name {name!r} is taken by llm-core's own llm-core-{name}; choose another"
        )


def core_version() -> str:
    """The installed llm-core's version: what a generated package is written against."""
    try:
        return importlib.metadata.version("llm-core")
    except importlib.metadata.PackageNotFoundError:  # a source tree without metadata
        return "0.1.0"


def compatible_range(version: str) -> str:
    """``>=X.Y.Z,<X.(Y+1)``: this release and its patch releases (a 0.x minor release may
    change the engine's API; the HAL's own version check covers the contract)."""
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    major, minor = [*parts, 0, 0][:2]
    return f">={'.'.join(map(str, parts))},<{major}.{minor + 1}"


def render(plan: Plan) -> dict[str, str]:
    """Every file of the package: relative path -> text."""
    root = resources.files("llm_core") / "templates" / "new_backend"
    values = plan.values()
    files: dict[str, str] = {}
    for folder in VARIANTS[plan.variant]:
        for relative, template in _templates(root / folder):
            path = _output_path(relative, plan)
            files[path] = string.Template(template).substitute(values)
    return files


def _templates(folder: Traversable, prefix: str = "") -> list[tuple[str, str]]:
    """``(path relative to folder, text)`` of every ``*.tmpl`` file under ``folder``."""
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found += _templates(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(".tmpl"):
            found.append((prefix + entry.name, entry.read_text(encoding="utf-8")))
    return found


def _output_path(relative: str, plan: Plan) -> str:
    """``src/package/x.py.tmpl`` -> ``src/llm_core_NAME/x.py``; ``github/`` -> ``.github/``
    (a dot folder would not be shipped as package data)."""
    *folders, filename = relative.removesuffix(".tmpl").split("/")
    renamed = {"package": plan.package, "github": ".github"}
    return "/".join([*(renamed.get(f, f) for f in folders), filename])


def write_package(plan: Plan, output: Path) -> Path:
    """Write the package into ``output/llm-core-NAME``; refuses to touch an existing path."""
    root = Path(output) / plan.distribution
    if root.exists():
        raise FileExistsError(
            f"{root} already exists; remove it or choose another --output (nothing was written)"
        )
    files = render(plan)  # every template renders before anything is written
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
