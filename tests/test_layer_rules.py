"""The layer rules of DESIGN.md, checked on the source with ``ast``.

Import rules, on the import graph of tests/test_module_graph.py (every import, those under
``if TYPE_CHECKING:`` too, since a type is a dependency as well):

- core/ (``llm_core``) and hal/ (``llm_hal``) import no plugin (``llm_core_*``), not
  ``llm_triton``, no vendor SDK and never the conformance suite; the HAL imports nothing of core;
- the conformance suite imports no plugin and not ``llm_triton``: it reaches backends through
  the HAL's registry;
- a plugin (in-tree and the example) imports, of this repository, only ``llm_hal``, its own
  package and, for cuda and rocm, ``llm_triton``: never ``llm_core`` nor another plugin;
- ``llm_triton`` imports no plugin and not ``llm_core``.

Source rules:

- core/ does not name CUDA (``torch.cuda``, ``.cuda()``, ``device="cuda"``): devices belong
  to backends;
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
from test_module_graph import ROOT, Import, ImportGraph, dotted, tree_graph

VENDOR_SDKS = {"torch_npu", "cupy", "pyopencl", "triton", "pycuda", "tensorrt"}
TRITON_PLUGINS = {"llm_core_cuda", "llm_core_rocm"}
CUDA_DEVICE = re.compile(r"^cuda(:\d+)?$")

Finding = tuple[int, str]  # line, what


def _is_plugin(package: str) -> bool:
    return package.startswith("llm_core_")


def layer_violation(module: str, target: str) -> str | None:
    """Why ``module`` may not import ``target`` (both dotted names), or None when it may."""
    own, top = module.split(".")[0], target.split(".")[0]
    if own in {"llm_core", "llm_hal"}:
        if _is_plugin(top):
            return f"imports the plugin {target}"
        if top == "llm_triton":
            return f"imports {target}: Triton kernels belong to the cuda and rocm plugins"
        if top in VENDOR_SDKS:
            return f"imports the vendor SDK {target}"
        if top == "llm_conformance":
            return f"imports {target}: the conformance suite depends on core, not the reverse"
        if own == "llm_hal" and top == "llm_core":
            return f"imports {target}: the HAL is below core"
    elif own == "llm_conformance":
        if _is_plugin(top) or top == "llm_triton":
            return f"imports {target}: the suite reaches backends through the HAL only"
    elif own == "llm_triton":
        if _is_plugin(top):
            return f"imports the plugin {target}: llm_triton serves plugins, not the reverse"
        if top == "llm_core":
            return f"imports {target}: llm_triton reaches core only through llm_hal"
    elif _is_plugin(own) and top != own:
        if top == "llm_core":
            return f"imports {target}: plugins reach core only through llm_hal"
        if _is_plugin(top):
            return f"imports the plugin {target}: a plugin never imports another plugin"
        if top == "llm_triton" and own not in TRITON_PLUGINS:
            return f"imports {target}: only the cuda and rocm plugins use llm_triton"
        if top == "llm_conformance":
            return f"imports {target}: plugins use llm_hal only"
    return None


def _violations(imports: list[Import], graph: ImportGraph) -> list[str]:
    found = []
    for imp in imports:
        why = layer_violation(imp.module, imp.target)
        if why is not None:
            found.append(f"{graph.paths[imp.module]}:{imp.line}: {why}")
    return found


def _tree_violations(*packages: str) -> list[str]:
    graph = tree_graph()
    imports = [i for i in graph.imports if _package_kind(i.module) in packages]
    return _violations(imports, graph)


def _package_kind(module: str) -> str:
    top = module.split(".")[0]
    return "plugin" if _is_plugin(top) else top


def _snippet_violations(source: str, module: str, label: str | None = None) -> list[str]:
    relative = module.replace(".", "/") + ".py"
    graph = ImportGraph({relative: source}, {relative: label or relative})
    return _violations(graph.imports, graph)


def _sources(*folders: str) -> list[Path]:
    files = [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]
    return [p for p in files if "build" not in p.relative_to(ROOT).parts]


def _plugin_sources() -> list[Path]:
    return _sources("plugins") + _sources("examples")


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def cuda_names(tree: ast.AST) -> list[Finding]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "cuda":
            bad.append((node.lineno, f"names {dotted(node)}"))
        elif isinstance(node, ast.keyword) and node.arg == "device":
            if isinstance(node.value, ast.Constant) and CUDA_DEVICE.match(str(node.value.value)):
                bad.append((node.value.lineno, f"device={node.value.value!r}"))
        elif isinstance(node, ast.Call) and dotted(node.func).split(".")[-1] in {"device", "to"}:
            for arg in node.args:
                if isinstance(arg, ast.Constant) and CUDA_DEVICE.match(str(arg.value)):
                    bad.append((node.lineno, f"{dotted(node.func)}({arg.value!r})"))
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
                bad.append((t.lineno, f"assigns {dotted(t)}"))
            elif isinstance(t, ast.Subscript) and dotted(t.value) == "sys.modules":
                bad.append((t.lineno, "writes into sys.modules"))
        if (
            isinstance(node, ast.Call)
            and dotted(node.func) in {"setattr", "delattr"}
            and node.args
            and root(node.args[0]) in imported
        ):
            bad.append((node.lineno, f"{dotted(node.func)} on {dotted(node.args[0])}"))
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
    kinds = {_package_kind(i.module) for i in tree_graph().imports}
    assert {"llm_core", "llm_hal", "llm_conformance", "llm_triton", "plugin"} <= kinds


def test_core_and_hal_import_no_plugin_no_triton_no_vendor_sdk_and_not_the_suite() -> None:
    assert _tree_violations("llm_core", "llm_hal") == []


def test_the_conformance_suite_imports_no_plugin_and_not_llm_triton() -> None:
    assert _tree_violations("llm_conformance") == []


def test_plugins_import_only_the_hal_their_own_package_and_llm_triton() -> None:
    assert _tree_violations("plugin") == []


def test_the_example_plugins_tests_follow_the_plugin_rule() -> None:
    found = []
    for path in _sources("examples"):
        if "tests" in path.relative_to(ROOT).parts:
            label = path.relative_to(ROOT).as_posix()
            found += _snippet_violations(path.read_text(), "llm_core_example.tests", label)
    assert found == []


def test_llm_triton_imports_no_plugin_and_not_llm_core() -> None:
    assert _tree_violations("llm_triton") == []


def test_core_does_not_name_cuda() -> None:
    assert _report(_sources("core"), cuda_names) == []


def test_nothing_monkeypatches() -> None:
    files = _plugin_sources() + _sources("hal", "core", "conformance")
    assert _report(files, monkeypatches) == []


# -------------------------------------------------------------------------------------------
# the checks themselves
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import llm_core_cuda", "llm_core.engine.x"),
        ("from llm_core_cpu.backend import CpuBackend", "llm_core.engine.x"),
        ("import importlib\nimportlib.import_module('llm_core_opencl')", "llm_core.x"),
        ("import torch_npu", "llm_core.x"),
        ("from cupy import cuda", "llm_core.x"),
        ("def f():\n    import triton.language as tl", "llm_core.x"),
        ("from llm_triton.backend import TritonBackend", "llm_core.x"),
        ("from llm_conformance import Conformance", "llm_core.commands.x"),
        ("def f():\n    import llm_conformance.runner", "llm_core.x"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llm_core_cpu",
            "llm_core.x",
        ),
        ("import llm_core_ascend.ops", "llm_hal.x"),
        ("import llm_triton", "llm_hal.x"),
        ("import pyopencl as cl", "llm_hal.x"),
        ("from llm_conformance.runner import Conformance", "llm_hal.x"),
        ("from llm_core.engine import LLMEngine", "llm_hal.x"),
        ("import llm_core_cpu", "llm_conformance.x"),
        ("from llm_triton.kernels import rms_norm", "llm_conformance.x"),
        (
            "import importlib\nimportlib.import_module('llm_core_opencl.plugin')",
            "llm_conformance.x",
        ),
        ("from llm_core.engine import LLMEngine", "llm_core_cpu.x"),
        ("import llm_core", "llm_core_opencl.x"),
        ("from llm_core_cpu.backend import CpuBackend", "llm_core_opencl.x"),
        ("def f():\n    import llm_core_cuda.plugin", "llm_core_rocm.x"),
        ("import llm_core_cpu", "llm_core_example.x"),
        ("from llm_triton.backend import TritonBackend", "llm_core_cpu.x"),
        ("import llm_triton", "llm_core_ascend.x"),
        ("import llm_conformance", "llm_core_cuda.x"),
        ("from llm_core_cuda.backend import CudaBackend", "llm_triton.x"),
        ("import llm_core.engine", "llm_triton.x"),
    ],
)
def test_forbidden_imports_are_caught(source: str, module: str) -> None:
    assert len(_snippet_violations(source, module)) == 1


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import torch\nfrom llm_hal import TorchBackend\nimport llm_core_cpu", "llm_core_cpu.x"),
        ("from llm_hal import get_registry\nimport numpy\nimport llm_core.engine", "llm_core.x"),
        ("from llm_hal.dtypes import DType\nimport torch", "llm_hal.x"),
        ("from .backend import X", "llm_core_cpu.plugin"),
        ("from ..backend import X", "llm_core_opencl.kernels.x"),
        (
            "from llm_triton.backend import TritonBackend\nimport llm_core_cuda.ops",
            "llm_core_cuda.x",
        ),
        ("from llm_triton import kernels\nfrom llm_hal import DType", "llm_core_rocm.x"),
        (
            "import triton\nimport triton.language as tl\nfrom llm_hal import Backend",
            "llm_triton.x",
        ),
        (
            "from llm_core import SamplingParams\nfrom llm_hal import get_registry",
            "llm_conformance.x",
        ),
        ("import pytest\nimport torch", "llm_conformance.x"),
    ],
)
def test_allowed_imports_pass(source: str, module: str) -> None:
    assert _snippet_violations(source, module) == []


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
