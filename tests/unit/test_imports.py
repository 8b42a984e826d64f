"""src/reap has no import cycle, counting the imports inside functions too (a function-level import that only
dodges a cycle is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "reap"


def import_graph(package: Path, name: str = "reap") -> dict[str, set[str]]:
    """module -> the modules of the package it imports (anywhere in its code)."""
    modules = {
        ".".join((name, *p.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        for p in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        mod = ".".join((name, *path.relative_to(package).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[mod] = {d for d in deps if d in modules and d != mod and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that lies on a cycle, with one cycle through it."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for dep in sorted(graph.get(node, ())):
                if dep == start:
                    found.append([*path, start])
                    stack.clear()
                    break
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*path, dep]))
    return found


def test_reap_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert {"reap.build", "reap.parallel", "reap.engine", "reap.prune"} <= set(graph)
    assert cycles(graph) == []
    assert "reap.build" not in graph["reap.parallel"] and "reap.parallel" not in graph["reap.engine"]


def test_the_check_finds_a_cycle_even_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg, "pkg")) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.b", "pkg.c", "pkg.a", "pkg.b"],
        ["pkg.c", "pkg.a", "pkg.b", "pkg.c"],
    ]
