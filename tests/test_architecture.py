"""Which rooms may import which, checked on the source (AST), lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import moepic

PACKAGE = Path(moepic.__file__).parent


def imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` (the text of `module`, dotted) imports, relative imports resolved."""
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
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


def imports_of_package(folder: str) -> dict[str, set[str]]:
    """{module: its imports} for every module under moepic/`folder`."""
    out = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[module] = imported_modules(path.read_text(), module)
    return out


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
