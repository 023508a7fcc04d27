"""torch-npu's operator schemas and shape functions, read out of its wheel and registered with
``torch.library``: the ``npu`` operators without an NPU, to check calls rather than run them.

The wheel is never installed (an installed torch-npu changes what ``import torch`` does). Two
files are read out of it: ``npu_native_functions_by_codegen.yaml``, torch-npu's schema of every
custom operator, and ``op_plugin/meta/_meta_registrations.py``, torch-npu's own shape functions.
:func:`register` defines the operators the backend calls under ``torch.ops.npu`` with those
schemas, the wheel's shape functions as Meta kernels (two written from the operator docs where
the wheel has none) and, if given, CPU kernels such as :mod:`support.ascend_emulation`. Under
``FakeTensorMode`` a call then fails unless its argument names, types and count match
torch-npu's signature and its shapes pass torch-npu's own shape checks.
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from llm_core_ascend.ops import TORCH_NPU_VERSION

#: A torch-npu wheel to read instead of the cached or downloaded one.
WHEEL_ENV = "LLM_CORE_TORCH_NPU_WHEEL"
DEFAULT_CACHE = Path("~/.cache/llm-core/wheels").expanduser()
SCHEMA_FILE = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
META_FILE = "torch_npu/op_plugin/meta/_meta_registrations.py"
GRAPHS_FILE = "torch_npu/npu/graphs.py"
GRAPH_HANDLERS = "torch_npu/npu/_npugraph_handlers/"
#: The wheel's contents do not depend on the platform; this one exists for every release.
WHEEL_PLATFORM = ("manylinux_2_28_x86_64", "3.11")

#: Every torch-npu operator the backend calls.
BACKEND_OPS = (
    "npu_rms_norm",
    "npu_add_rms_norm",
    "npu_swiglu",
    "npu_apply_rotary_pos_emb",
    "npu_rotary_mul",
    "npu_scatter_pa_kv_cache",
    "npu_fused_infer_attention_score",
    "npu_format_cast",
    "npu_weight_quant_batchmatmul",
    "npu_convert_weight_to_int4pack",
    "npu_dynamic_quant",
    "npu_quant_matmul",
)

# Lines of the meta file that need torch-npu itself; stand-ins are put in their place below.
_SKIPPED_LINES = (
    "import torch_npu",
    "from torch_npu",
    "from torch.library import",
    "from torch.fx.node import has_side_effect",
    "has_side_effect(",
)


def find_wheel(version: str = TORCH_NPU_VERSION, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The torch-npu wheel: ``$LLM_CORE_TORCH_NPU_WHEEL``, else one in ``cache_dir``, else
    downloaded there with ``pip download --no-deps``. Raises FileNotFoundError with pip's
    message when it cannot be had (offline, no such release)."""
    named = os.environ.get(WHEEL_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV}={named} is not a file")
        return path
    cached = sorted(cache_dir.glob(f"torch_npu-{version}-*.whl"))
    if cached:
        return cached[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    platform, python = WHEEL_PLATFORM
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--platform",
        platform,
        "--python-version",
        python,
        "--disable-pip-version-check",
        "-d",
        str(cache_dir),
        f"torch-npu=={version}",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise FileNotFoundError(f"pip download of torch-npu {version} timed out") from exc
    cached = sorted(cache_dir.glob(f"torch_npu-{version}-*.whl"))
    if done.returncode or not cached:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FileNotFoundError(f"could not download torch-npu {version}: {' '.join(tail)}")
    return cached[0]


@dataclass(frozen=True, slots=True)
class WheelOps:
    """The custom operators of one torch-npu wheel."""

    version: str
    schemas: dict[str, tuple[str, ...]]  # operator name -> the schema of each overload
    meta: dict[str, Callable[..., Any]]  # "name" or "name.overload" -> shape function

    @classmethod
    def read(cls, wheel: Path) -> WheelOps:
        with zipfile.ZipFile(wheel) as z:
            listing = yaml.load(z.read(SCHEMA_FILE), Loader=_yaml_loader())
            meta_source = z.read(META_FILE).decode()
            version_file = z.read("torch_npu/version.py").decode()
        schemas: dict[str, list[str]] = {}
        for entry in listing["custom"]:  # the npu:: operators (the rest are aten overrides)
            schema = entry["func"]
            schemas.setdefault(schema.split("(")[0].split(".")[0], []).append(schema)
        version: dict[str, Any] = {}
        exec(compile(version_file, "torch_npu/version.py", "exec"), version)
        return cls(
            str(version["__version__"]),
            {name: tuple(s) for name, s in schemas.items()},
            _read_shape_functions(meta_source),
        )


@functools.cache
def read_wheel(wheel: Path) -> WheelOps:
    """:meth:`WheelOps.read`, once per wheel and process."""
    return WheelOps.read(wheel)


@dataclass(frozen=True, slots=True)
class GraphAPI:
    """torch-npu's graph API as its source in the wheel defines it (read, never imported).

    ``signatures``: parameter names (``self`` dropped) of the functions and methods of
    ``torch_npu/npu/graphs.py``, keyed ``"name"`` or ``"Class.method"``. ``update_keys``: for
    every operator overload torch-npu records as an updatable task group under
    ``auto_dispatch_capture`` (its graph handlers), the arguments ``NPUGraph.update`` re-issues
    (the handler's ``UPDATE_SPECS``)."""

    signatures: dict[str, tuple[str, ...]]
    update_keys: dict[str, tuple[str, ...]]

    @classmethod
    def read(cls, wheel: Path) -> GraphAPI:
        with zipfile.ZipFile(wheel) as z:
            graphs_source = z.read(GRAPHS_FILE).decode()
            handlers = [
                z.read(name).decode()
                for name in z.namelist()
                if name.startswith(GRAPH_HANDLERS) and name.endswith(".py")
            ]
        signatures: dict[str, tuple[str, ...]] = {}
        for node in ast.parse(graphs_source).body:
            if isinstance(node, ast.FunctionDef):
                signatures[node.name] = _parameters(node)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        signatures[f"{node.name}.{item.name}"] = _parameters(item)
        update_keys: dict[str, tuple[str, ...]] = {}
        for source in handlers:
            for found in ast.walk(ast.parse(source)):
                if isinstance(found, ast.ClassDef):
                    update_keys.update(_handled_ops(found))
        return cls(signatures, update_keys)


def _parameters(fn: ast.FunctionDef) -> tuple[str, ...]:
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return tuple(n for n in names if n not in ("self", "cls"))


def _handled_ops(node: ast.ClassDef) -> dict[str, tuple[str, ...]]:
    """Operator overload -> updatable arguments, for a class decorated with torch-npu's
    ``register_npu_graph_handler([...])`` (the keys of its ``UPDATE_SPECS``, if any)."""
    names: list[str] = []
    for deco in node.decorator_list:
        if isinstance(deco, ast.Call) and getattr(deco.func, "id", "") == (
            "register_npu_graph_handler"
        ):
            names += ast.literal_eval(deco.args[0])
    specs: dict[str, list[tuple[str, Any, str]]] = {}
    for item in node.body:
        if isinstance(item, ast.Assign) and any(
            getattr(t, "id", "") == "UPDATE_SPECS" for t in item.targets
        ):
            specs = ast.literal_eval(item.value)
    return {name: tuple(key for _, _, key in specs.get(name, ())) for name in names}


@functools.cache
def read_graph_api(wheel: Path) -> GraphAPI:
    """:meth:`GraphAPI.read`, once per wheel and process."""
    return GraphAPI.read(wheel)


def _yaml_loader() -> Any:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Anything:
    """Stands in for torch-npu's attributes in the meta file (its own dtypes such as
    ``torch_npu.hifloat8``): each is a fresh object, equal to nothing we pass."""

    def __getattr__(self, name: str) -> Any:
        return _Anything()


def _read_shape_functions(source: str) -> dict[str, Callable[..., Any]]:
    """Run torch-npu's meta file with its registrations collected instead of made."""
    lines = [
        "" if line.strip().startswith(_SKIPPED_LINES) else line for line in source.splitlines()
    ]
    found: dict[str, Callable[..., Any]] = {}

    class Library:
        def __init__(self, ns: str, kind: str, key: str = ""):
            self.ns = ns

    def impl(lib: Library, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def collect(fn: Callable[..., Any]) -> Callable[..., Any]:
            if lib.ns == "npu":  # its aten overrides are not ours to touch
                found[name] = fn
            return fn

        return collect

    namespace: dict[str, Any] = {
        "__name__": "torch_npu_meta_registrations",
        "Library": Library,
        "impl": impl,
        "torch_npu": _Anything(),
        "ErrCode": _Anything(),
        "ops_error": lambda *args: "",
        "get_cann_version": lambda: "8.5.0",
        "get_soc_version": lambda: 220,  # an Atlas A2 (Ascend 910B)
        "has_side_effect": lambda op: None,
    }
    exec(compile("\n".join(lines), META_FILE, "exec"), namespace)
    return found


# -------------------------------------------------------------------------------------------
# shape functions written from the operator docs, for the operators the wheel has none for
# -------------------------------------------------------------------------------------------


def _format_cast_shape(
    self: torch.Tensor, acl_format: int, *, customize_dtype: Any = None, input_dtype: Any = None
) -> torch.Tensor:
    # An internal format keeps the tensor's logical shape and dtype.
    return torch.empty_like(self)


def _int4pack_shape(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    torch._check(weight.dtype == torch.int32, lambda: "the weight to pack must be int32")
    torch._check(
        weight.dim() == 2 and weight.shape[-1] % 8 == 0,
        lambda: "the weight to pack must be 2-D with a last dimension divisible by 8",
    )
    return weight.new_empty((weight.shape[0], weight.shape[1] // 8))


DOC_SHAPE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "npu_format_cast": _format_cast_shape,
    "npu_convert_weight_to_int4pack": _int4pack_shape,
}


# -------------------------------------------------------------------------------------------
# registration
# -------------------------------------------------------------------------------------------

_library: Any = None  # the torch.library.Library holding the definitions (kept alive here)
_defined: set[str] = set()
_cpu_kernels: set[str] = set()


def register(
    wheel_ops: WheelOps,
    names: Iterable[str] = BACKEND_OPS,
    cpu_kernels: Mapping[str, Callable[..., Any]] | None = None,
) -> Any:
    """Define the named operators (every overload) under ``torch.ops.npu`` with the wheel's
    schemas and shape functions, and add ``cpu_kernels`` (operator name -> CPU kernel of its
    default overload). Idempotent; refuses to run next to a real torch-npu. Returns
    ``torch.ops.npu``."""
    global _library
    if "torch_npu" in sys.modules:
        raise RuntimeError("torch-npu is loaded in this process: its npu operators are real")
    if _library is None:
        _library = torch.library.Library("npu", "FRAGMENT")
    for name in names:
        if name not in wheel_ops.schemas:
            raise KeyError(f"torch-npu {wheel_ops.version} has no operator npu::{name}")
        for schema in wheel_ops.schemas[name]:
            qualified = schema.split("(")[0]
            if qualified in _defined:
                continue
            _library.define(schema)
            shape_fn = wheel_ops.meta.get(qualified) or DOC_SHAPE_FUNCTIONS.get(qualified)
            if shape_fn is not None:
                _library.impl(qualified, shape_fn, "Meta")
            _defined.add(qualified)
    for name, kernel in (cpu_kernels or {}).items():
        if name not in _cpu_kernels:
            _library.impl(name, kernel, "CPU")
            _cpu_kernels.add(name)
    return torch.ops.npu
