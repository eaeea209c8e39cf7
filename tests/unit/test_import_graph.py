"""The package's import graph, built with ``ast`` from module-level imports, has no cycle:
not between files, and not between the children (modules and subpackages) of any package.

``lint-imports`` (``[tool.importlinter]`` in pyproject.toml) checks the layers; this test
checks what a layer list cannot say: no two files, and no two siblings at any depth, need
each other. Imports inside functions are not counted (they run later, on purpose).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import vllm_batch

ROOT = Path(vllm_batch.__file__).parent
PACKAGE = "vllm_batch"


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its ``__init__``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _module_level(body: Iterable[ast.stmt]) -> Iterable[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (also under ``if``/``try``)."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level(block)
            for handler in node.handlers:
                yield from _module_level(handler.body)


def import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports at module level."""
    modules = module_files()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _module_level(ast.parse(path.read_text()).body):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                if target.split(".")[0] == PACKAGE:
                    found = known(target)
                    if found is not None and found != name:
                        graph[name].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def sibling_graphs(graph: dict[str, set[str]]) -> dict[str, dict[str, set[str]]]:
    """For each package: its children → the children they import (through any descendant)."""
    out: dict[str, dict[str, set[str]]] = {}
    for source, targets in graph.items():
        for target in targets:
            a, b = source.split("."), target.split(".")
            depth = 0
            while depth < min(len(a), len(b)) and a[depth] == b[depth]:
                depth += 1
            if depth == len(a) or depth == len(b):
                continue  # a package and its own descendant: not siblings
            parent = ".".join(a[:depth])
            children = out.setdefault(parent, {})
            children.setdefault(a[depth], set()).add(b[depth])
    return out


def test_graph_sees_the_package() -> None:
    """The graph is real: it finds known imports (a broken parser would pass vacuously)."""
    graph = import_graph()
    assert len(graph) > 100
    assert "vllm_batch.batches.store.rows" in graph["vllm_batch.batches.store.queries"]
    assert "vllm_batch.config" in graph["vllm_batch.engines.manager"]


def test_no_cycle_between_files() -> None:
    assert find_cycle(import_graph()) is None


def test_no_cycle_between_packages() -> None:
    """At every level (the top-level packages, and inside each package) siblings form a DAG."""
    cycles = {}
    for parent, children in sibling_graphs(import_graph()).items():
        cycle = find_cycle(children)
        if cycle:
            cycles[parent] = " -> ".join(cycle)
    assert cycles == {}


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_names_are_unique() -> None:
    """No two modules share a file name and no two classes a name (a reader never wonders
    which ``queries`` or ``Dispatcher`` is meant); packages' ``__init__`` and the numbered
    migrations aside."""
    modules = [
        path
        for path in module_files().values()
        if path.name != "__init__.py" and "migrations" not in path.parts
    ]
    names = [path.stem for path in modules]
    assert sorted({n for n in names if names.count(n) > 1}) == []
    classes = [
        node.name
        for path in modules
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef)
    ]
    assert sorted({c for c in classes if classes.count(c) > 1}) == []
