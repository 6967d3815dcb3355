"""Which rooms may import which, checked on the source (AST), lazy imports inside functions included:
a lazy import hides a dependency from Python at start-up, not from a reader. The package's import
graph has no cycle, so each module can be read, tested and moved knowing only what is below it."""

from __future__ import annotations

import ast
from pathlib import Path

import moepic

PACKAGE = Path(moepic.__file__).parent


def imported_modules(source: str, module: str, modules: set[str] | None = None) -> set[str]:
    """Every module `source` (the text of `module`, dotted) imports, relative imports resolved. With
    `modules` (the package's), each name resolves to the module it is: `from moepic.policies import
    own_future` is moepic.policies.own_future alone, `from moepic.policies import POLICIES` moepic.policies."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x` in moepic/a/b.py: relative to moepic.a
                base = module.split(".")[: -node.level]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            named = {f"{prefix}.{alias.name}" for alias in node.names}
            if modules is None:
                out |= named | {prefix}
            else:
                out |= {name if name in modules else prefix for name in named}
    return out


def imports_of_package(folder: str) -> dict[str, set[str]]:
    """{module: its imports} for every module under moepic/`folder` ("": the whole package)."""
    paths = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {module: imported_modules(path.read_text(), module, set(paths) if folder == "" else None) for module, path in paths.items()}


def is_in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_import_finder_sees_plain_from_lazy_and_relative_imports():
    source = (
        "import moepic.runtime.offload\n"
        "from moepic.core import weights\n"
        "def f():\n    from moepic.runtime.host_store import HostExpertStore\n"
        "from ..runtime import copy_engine\n"
    )
    found = imported_modules(source, "moepic.checkpoint.load")
    assert {"moepic.runtime.offload", "moepic.core.weights", "moepic.runtime.host_store", "moepic.runtime.copy_engine"} <= found
    assert [name for name in found if is_in(name, "moepic.runtime")]


def test_the_checkpoint_loader_does_not_import_the_runtime():
    """Loading weights is pure I/O into the core's tree: it needs the core's packing, not the engine."""
    modules = imports_of_package("checkpoint")
    assert "moepic.checkpoint.load" in modules
    offending = {module: sorted(n for n in names if is_in(n, "moepic.runtime")) for module, names in modules.items()}
    assert {module: names for module, names in offending.items() if names} == {}


def import_graph() -> dict[str, set[str]]:
    """{module: the moepic modules it imports} over the whole package."""
    modules = imports_of_package("")
    return {module: (names & modules.keys()) - {module} for module, names in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_within(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    following.append(w)
        frontier = following
    raise AssertionError("a strongly connected component without a cycle")


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    # cli.py imports the heavy parts of a command only when it runs: those edges are in the graph too.
    graph = import_graph()
    assert "moepic.commands.generate" in graph["moepic.cli"]
    assert "moepic.runtime.generation" in graph["moepic.commands.generate"]
