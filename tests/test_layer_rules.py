"""The layer rules of DESIGN.md, checked on the source with ``ast``.

- core/ and hal/ import no plugin (``llm_core_*``) and no vendor SDK;
- core/ does not name CUDA (``torch.cuda``, ``.cuda()``, ``device="cuda"``): devices belong
  to backends;
- plugins (in-tree and the example) reach llm-core only through ``llm_hal``;
- nothing monkeypatches: no assignment to an attribute of an imported module or class, no
  ``setattr`` on one, no writes into ``sys.modules``.

Each check also runs on small bad snippets, so a check that cannot fail would be noticed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENDOR_SDKS = {"torch_npu", "cupy", "pyopencl", "triton", "pycuda", "tensorrt"}
CUDA_DEVICE = re.compile(r"^cuda(:\d+)?$")

Finding = tuple[int, str]  # line, what


def _sources(*folders: str) -> list[Path]:
    files = [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]
    return [p for p in files if "build" not in p.relative_to(ROOT).parts]


def _plugin_sources() -> list[Path]:
    return _sources("plugins") + _sources("examples")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST) -> list[Finding]:
    """Absolute modules imported, statically or through ``importlib.import_module("...")``."""
    found: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and _dotted(node.func) in {"importlib.import_module", "import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def forbidden_imports(tree: ast.AST, layer: str) -> list[Finding]:
    """``layer`` is "core" (hal follows the same rule) or "plugin"."""
    bad = []
    for line, module in _imports(tree):
        top = module.split(".")[0]
        if layer == "plugin":
            if top == "llm_core":
                bad.append((line, f"imports {module}: plugins use llm_hal only"))
        elif top.startswith("llm_core_"):
            bad.append((line, f"imports the plugin {module}"))
        elif top in VENDOR_SDKS:
            bad.append((line, f"imports the vendor SDK {module}"))
    return bad


def cuda_names(tree: ast.AST) -> list[Finding]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            bad.append((node.lineno, f"names {_dotted(node)}"))
        elif isinstance(node, ast.keyword) and node.arg == "device":
            if isinstance(node.value, ast.Constant) and CUDA_DEVICE.match(str(node.value.value)):
                bad.append((node.value.lineno, f"device={node.value.value!r}"))
        elif isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in {"device", "to"}:
            for arg in node.args:
                if isinstance(arg, ast.Constant) and CUDA_DEVICE.match(str(arg.value)):
                    bad.append((node.lineno, f"{_dotted(node.func)}({arg.value!r})"))
    return bad


def monkeypatches(tree: ast.AST) -> list[Finding]:
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {a.asname or a.name for a in node.names}

    def root(target: ast.AST) -> str | None:
        while isinstance(target, ast.Attribute | ast.Subscript):
            target = target.value
        return target.id if isinstance(target, ast.Name) else None

    bad = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and root(t) in imported:
                bad.append((t.lineno, f"assigns {_dotted(t)}"))
            elif isinstance(t, ast.Subscript) and _dotted(t.value) == "sys.modules":
                bad.append((t.lineno, "writes into sys.modules"))
        if (
            isinstance(node, ast.Call)
            and _dotted(node.func) in {"setattr", "delattr"}
            and node.args
            and root(node.args[0]) in imported
        ):
            bad.append((node.lineno, f"{_dotted(node.func)} on {_dotted(node.args[0])}"))
    return bad


def _report(files: list[Path], check: Callable[..., list[Finding]], *args: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in files
        for line, what in check(_tree(path), *args)
    ]


# -------------------------------------------------------------------------------------------
# the rules, on this repository
# -------------------------------------------------------------------------------------------


def test_there_is_source_to_check() -> None:
    names = {p.name for p in _sources("core", "hal")}
    assert {"backend.py", "registry.py"} <= names
    assert any(p.parent.name == "llm_core_cpu" for p in _plugin_sources())
    assert any(p.parent.name == "llm_core_example" for p in _plugin_sources())


def test_core_and_hal_import_no_plugin_and_no_vendor_sdk() -> None:
    assert _report(_sources("core", "hal"), forbidden_imports, "core") == []


def test_core_does_not_name_cuda() -> None:
    assert _report(_sources("core"), cuda_names) == []


def test_plugins_reach_core_only_through_the_hal() -> None:
    assert _report(_plugin_sources(), forbidden_imports, "plugin") == []


def test_nothing_monkeypatches() -> None:
    assert _report(_plugin_sources() + _sources("hal", "core"), monkeypatches) == []


# -------------------------------------------------------------------------------------------
# the checks themselves
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "layer"),
    [
        ("import llm_core_cuda", "core"),
        ("from llm_core_cpu.backend import CpuBackend", "core"),
        ("import importlib\nimportlib.import_module('llm_core_opencl')", "core"),
        ("import torch_npu", "core"),
        ("from cupy import cuda", "core"),
        ("def f():\n    import triton.language as tl", "core"),
        ("from llm_core.engine import LLMEngine", "plugin"),
        ("import llm_core", "plugin"),
    ],
)
def test_forbidden_imports_are_caught(source: str, layer: str) -> None:
    assert len(forbidden_imports(ast.parse(source), layer)) == 1


@pytest.mark.parametrize(
    ("source", "layer"),
    [
        ("import torch\nfrom llm_hal import TorchBackend\nimport llm_core_cpu", "plugin"),
        ("from llm_hal import get_registry\nimport numpy\nimport llm_core.engine", "core"),
        ("from .backend import X", "plugin"),
    ],
)
def test_allowed_imports_pass(source: str, layer: str) -> None:
    assert forbidden_imports(ast.parse(source), layer) == []


@pytest.mark.parametrize(
    "source",
    [
        "torch.cuda.synchronize()",
        "x = y.cuda()",
        "torch.zeros(3, device='cuda')",
        "t.to('cuda:1')",
        "d = torch.device('cuda')",
    ],
)
def test_cuda_names_are_caught(source: str) -> None:
    assert len(cuda_names(ast.parse(source))) == 1


def test_backend_names_are_not_cuda_uses() -> None:
    source = "registry.create('cuda')\nhelp = 'pip install llm-core[cuda]'\nx.to('cpu')"
    assert cuda_names(ast.parse(source)) == []


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.matmul = fast_matmul",
        "import torch.nn.functional as F\nF.silu = my_silu",
        "from llm_hal import TorchBackend\nTorchBackend.silu_and_mul = mine",
        "import llm_hal\nllm_hal.reference.TorchBackend.linear += 1",
        "import llm_core\nsetattr(llm_core.engine, 'step', mine)",
        "import sys\nsys.modules['llm_core.models'] = fake",
    ],
)
def test_monkeypatches_are_caught(source: str) -> None:
    assert len(monkeypatches(ast.parse(source))) == 1


def test_own_attributes_are_not_monkeypatches() -> None:
    source = (
        "import torch\n"
        "class B:\n    def __init__(self):\n        self.device = torch.device('cpu')\n"
        "cache = {}\ncache['k'] = 1\nobj = B()\nobj.x = 2\n"
    )
    assert monkeypatches(ast.parse(source)) == []
