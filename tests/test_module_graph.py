"""No import cycles: the import graph of every package in the tree, built from the source.

The graph has an edge for every import that runs: ``import a.b``, ``from a import b`` (an import
of ``a.b`` when that is a module, else of ``a``), relative imports, imports inside functions
and ``importlib.import_module("a.b")`` with a literal name. Imports under ``if TYPE_CHECKING:``
never run: they are recorded (the layer rules of tests/test_layer_rules.py read them too) but
make no edge. The packages: core, the HAL, the conformance suite, every folder under plugins/
and the example plugin.

Each check also runs on small synthetic module sets, so a checker that cannot fail would be
noticed.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORT_FUNCTIONS = {"importlib.import_module", "import_module", "__import__"}


@dataclass(frozen=True, slots=True)
class Import:
    """One import made by ``module``: ``target`` is the module it names (resolved), or the
    dotted name as written for anything outside the graph."""

    module: str
    target: str
    line: int
    type_checking: bool = False


@dataclass(frozen=True, slots=True)
class _RawImport:
    line: int
    base: str
    names: tuple[str, ...]  # empty for ``import base``
    type_checking: bool


def module_name(relative: str) -> tuple[str, bool]:
    """``pkg/sub/mod.py`` is ``("pkg.sub.mod", False)``, ``pkg/__init__.py`` ``("pkg", True)``."""
    parts = relative.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def _is_type_checking(test: ast.expr) -> bool:
    return dotted(test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[_RawImport] = []
        self._type_checking = False

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer, self._type_checking = self._type_checking, True
        for statement in node.body:
            self.visit(statement)
        self._type_checking = outer
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name, ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node.level, node.module or "")
        self._add(node.lineno, base, tuple(alias.name for alias in node.names))

    def visit_Call(self, node: ast.Call) -> None:
        if dotted(node.func) in IMPORT_FUNCTIONS and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                level = len(name.value) - len(name.value.lstrip("."))
                self._add(node.lineno, self._absolute(level, name.value[level:]), ())
        self.generic_visit(node)

    def _absolute(self, level: int, name: str) -> str:
        if level == 0:
            return name
        parts = self.package.split(".")
        base = ".".join(parts[: len(parts) - (level - 1)])
        return f"{base}.{name}" if name else base

    def _add(self, line: int, base: str, names: tuple[str, ...]) -> None:
        self.found.append(_RawImport(line, base, names, self._type_checking))


class ImportGraph:
    """The modules of some packages and every import they make.

    ``sources`` maps a path relative to the folder holding the packages (``pkg/sub/mod.py``)
    to its source text; ``labels`` optionally maps the same keys to what messages show.
    """

    def __init__(self, sources: Mapping[str, str], labels: Mapping[str, str] | None = None):
        self.paths: dict[str, str] = {}
        raw: dict[str, list[_RawImport]] = {}
        for relative, text in sources.items():
            module, is_package = module_name(relative)
            self.paths[module] = (labels or {}).get(relative, relative)
            tree = ast.parse(text, filename=self.paths[module])
            collector = _Collector(module, is_package)
            collector.visit(tree)
            raw[module] = collector.found
        self.imports = [
            Import(module, target, r.line, r.type_checking)
            for module, found in raw.items()
            for r in found
            for target in self._targets(r)
        ]

    @classmethod
    def of_packages(cls, roots: list[Path]) -> ImportGraph:
        sources: dict[str, str] = {}
        labels: dict[str, str] = {}
        for root in roots:
            for path in sorted(root.rglob("*.py")):
                relative = path.relative_to(root.parent).as_posix()
                sources[relative] = path.read_text()
                labels[relative] = path.relative_to(ROOT).as_posix()
        return cls(sources, labels)

    def _targets(self, raw: _RawImport) -> list[str]:
        if not raw.names:
            return [self._known_prefix(raw.base)]
        targets = []
        for name in raw.names:
            target = f"{raw.base}.{name}"
            target = target if target in self.paths else self._known_prefix(raw.base)
            if target not in targets:
                targets.append(target)
        return targets

    def _known_prefix(self, name: str) -> str:
        """The longest leading part of ``name`` that is a module of the graph, else ``name``."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.paths:
                return ".".join(parts[:end])
        return name

    def edges(self) -> dict[str, set[str]]:
        """Module -> the modules of the graph it imports at run time (no self-edges)."""
        edges: dict[str, set[str]] = {module: set() for module in self.paths}
        for imp in self.imports:
            if not imp.type_checking and imp.target in self.paths and imp.target != imp.module:
                edges[imp.module].add(imp.target)
        return edges

    def where(self, module: str, target: str) -> str:
        lines = sorted(
            i.line
            for i in self.imports
            if i.module == module and i.target == target and not i.type_checking
        )
        return f"{self.paths[module]}:{lines[0]}"

    def components(self) -> list[set[str]]:
        """The sets of two or more modules that import each other, directly or not."""
        return sorted(_components(self.edges()), key=min)

    def cycles(self) -> list[list[str]]:
        """One shortest cycle per component, as ``[a, b, ..., a]``."""
        edges = self.edges()
        return [_shortest_cycle(edges, c, min(c)) for c in self.components()]

    def describe(self, cycle: list[str]) -> str:
        """``a -> b -> a`` and, under it, the line of each import."""
        steps = "".join(
            f"\n    {self.where(a, b)}: {a} imports {b}" for a, b in itertools.pairwise(cycle)
        )
        return " -> ".join(cycle) + steps

    def report(self) -> str:
        """Every component: its modules, and one of its cycles described."""
        edges = self.edges()
        return "\n".join(
            f"{len(c)} modules import each other: {', '.join(sorted(c))}\n  "
            + self.describe(_shortest_cycle(edges, c, min(c)))
            for c in self.components()
        )


def _components(edges: dict[str, set[str]]) -> Iterator[set[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return (c for c in components if len(c) > 1)


def _shortest_cycle(edges: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(edges[node] & component):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is on no cycle of its component")


def package_roots() -> list[Path]:
    """Every import package of the tree: core, the HAL, the conformance suite, each package
    under plugins/ (the backends and llm_triton) and the example plugin."""
    roots = [ROOT / "core/llm_core", ROOT / "hal/llm_hal", ROOT / "conformance/llm_conformance"]
    roots += sorted(p.parent for p in ROOT.glob("plugins/*/*/__init__.py"))
    roots += sorted(p.parent for p in ROOT.glob("examples/*/src/*/__init__.py"))
    return roots


@functools.cache
def tree_graph() -> ImportGraph:
    """The import graph of every package of this repository."""
    return ImportGraph.of_packages(package_roots())


def _graph(modules: dict[str, str]) -> ImportGraph:
    """A synthetic graph: ``{"pkg/__init__": "...", "pkg/a": "..."}``."""
    return ImportGraph({f"{name}.py": source for name, source in modules.items()})


def _chains(graph: ImportGraph) -> list[str]:
    return [" -> ".join(cycle) for cycle in graph.cycles()]


# -------------------------------------------------------------------------------------------
# this repository
# -------------------------------------------------------------------------------------------


def test_every_package_is_in_the_graph() -> None:
    packages = {module for module in tree_graph().paths if "." not in module}
    assert {"llm_core", "llm_hal", "llm_conformance", "llm_triton", "llm_core_example"} <= packages
    assert {"llm_core_cpu", "llm_core_opencl", "llm_core_cuda", "llm_core_rocm"} <= packages
    assert "llm_core_ascend" in packages
    assert len(tree_graph().paths) > 100


def test_lazy_imports_of_the_tree_are_edges() -> None:
    edges = tree_graph().edges()
    assert "llm_core.loaders.gguf_loader" in edges["llm_core.loaders.opener"]
    assert "llm_conformance.certificate" in edges["llm_conformance.runner"]


def test_there_is_no_import_cycle() -> None:
    graph = tree_graph()
    assert graph.components() == [], "import cycles:\n" + graph.report()


# -------------------------------------------------------------------------------------------
# the checker itself
# -------------------------------------------------------------------------------------------


def test_a_cycle_is_found_and_printed_as_a_chain() -> None:
    graph = _graph({"pkg/__init__": "", "pkg/a": "import pkg.b", "pkg/b": "from pkg.a import X"})
    assert _chains(graph) == ["pkg.a -> pkg.b -> pkg.a"]
    assert graph.describe(graph.cycles()[0]) == (
        "pkg.a -> pkg.b -> pkg.a\n"
        "    pkg/a.py:1: pkg.a imports pkg.b\n"
        "    pkg/b.py:1: pkg.b imports pkg.a"
    )


def test_a_lazy_import_inside_a_function_closes_a_cycle() -> None:
    graph = _graph(
        {
            "pkg/__init__": "",
            "pkg/a": "from pkg.b import helper",
            "pkg/b": "def helper():\n    from pkg.a import thing\n    return thing",
        }
    )
    assert _chains(graph) == ["pkg.a -> pkg.b -> pkg.a"]


def test_import_module_with_a_literal_closes_a_cycle() -> None:
    graph = _graph(
        {
            "pkg/__init__": "",
            "pkg/a": "import pkg.b",
            "pkg/b": "import importlib\ndef f():\n    return importlib.import_module('pkg.a')",
        }
    )
    assert _chains(graph) == ["pkg.a -> pkg.b -> pkg.a"]


def test_relative_imports_are_resolved() -> None:
    graph = _graph(
        {
            "pkg/__init__": "from .sub import c",
            "pkg/a": "from . import b",
            "pkg/b": "from .sub.c import f",
            "pkg/sub/__init__": "",
            "pkg/sub/c": "from ..a import x",
        }
    )
    assert _chains(graph) == ["pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"]
    assert graph.edges()["pkg"] == {"pkg.sub.c"}


def test_from_package_import_name_is_the_package_unless_name_is_a_module() -> None:
    graph = _graph(
        {
            "pkg/__init__": "from pkg.a import VALUE",
            "pkg/a": "VALUE = 1",
            "pkg/b": "from pkg import a, VALUE",
        }
    )
    assert graph.edges()["pkg.b"] == {"pkg.a", "pkg"}
    assert _chains(graph) == []


def test_a_package_importing_from_its_own_module_that_imports_it_back_is_a_cycle() -> None:
    graph = _graph({"pkg/__init__": "from pkg.a import f", "pkg/a": "from pkg import CONSTANT"})
    assert _chains(graph) == ["pkg -> pkg.a -> pkg"]


def test_type_checking_imports_make_no_edge() -> None:
    graph = _graph(
        {
            "pkg/__init__": "",
            "pkg/a": "import pkg.b",
            "pkg/b": (
                "from typing import TYPE_CHECKING\n"
                "import typing\n"
                "if TYPE_CHECKING:\n    from pkg.a import A\n"
                "if typing.TYPE_CHECKING:\n    import pkg.a\n"
            ),
        }
    )
    assert _chains(graph) == []
    recorded = [i for i in graph.imports if i.module == "pkg.b" and i.target == "pkg.a"]
    assert [i.type_checking for i in recorded] == [True, True]


def test_the_else_branch_of_type_checking_counts() -> None:
    graph = _graph(
        {
            "pkg/__init__": "",
            "pkg/a": "import pkg.b",
            "pkg/b": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    pass\nelse:\n    import pkg.a\n"
            ),
        }
    )
    assert _chains(graph) == ["pkg.a -> pkg.b -> pkg.a"]


def test_each_component_is_reported_once_with_its_shortest_cycle() -> None:
    graph = _graph(
        {
            "pkg/__init__": "",
            "pkg/a": "import pkg.b\nimport pkg.c",
            "pkg/b": "import pkg.a",
            "pkg/c": "import pkg.d",
            "pkg/d": "import pkg.a",
            "pkg/x": "import pkg.y",
            "pkg/y": "import pkg.x",
        }
    )
    assert _chains(graph) == ["pkg.a -> pkg.b -> pkg.a", "pkg.x -> pkg.y -> pkg.x"]


def test_imports_of_modules_outside_the_graph_keep_their_names() -> None:
    graph = _graph(
        {"pkg/__init__": "", "pkg/a": "import torch.nn.functional as F\nfrom cupy import cuda"}
    )
    assert {i.target for i in graph.imports} == {"torch.nn.functional", "cupy"}
    assert graph.edges()["pkg.a"] == set()
