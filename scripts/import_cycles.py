"""List import cycles between the modules of conic_qp (module-level and function-level imports).

A cycle through a function-level (lazy) import still ties two modules into one unit: neither can
be understood, tested or moved without the other. This script parses every module with ``ast``
(nothing is imported), builds the graph of ``conic_qp`` imports, and prints every strongly
connected component with more than one module together with one concrete cycle through it.

Usage: ``python scripts/import_cycles.py [PACKAGE_DIR]``; exit code 1 when a cycle exists.
Imports under ``if TYPE_CHECKING:`` are ignored (they do not run).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """conic_qp modules imported anywhere in ``tree`` (resolved to existing modules)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                hit = resolve(alias.name)
                if hit:
                    found.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            for alias in node.names:
                hit = resolve(f"{prefix}.{alias.name}") or resolve(prefix)
                if hit:
                    found.add(hit)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    names = {module_name(f, root): f for f in files}
    known = set(names)
    graph: dict[str, set[str]] = {}
    for name, file in names.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        deps = _imports(tree, name, file.name == "__init__.py", known)
        # importing a submodule imports its packages too, but a package's own __init__ is not a
        # dependency of its submodules for the purpose of cycles: drop parent packages.
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterable[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(sorted(comp))
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    members = set(component)
    start = component[0]
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if child not in prev:
                prev[child] = node
                queue.append(child)
    return component


def find_cycles(root: Path) -> list[tuple[list[str], list[str]]]:
    """``(component, one cycle through it)`` per strongly connected component of > 1 module."""
    graph = import_graph(root)
    return [(c, one_cycle(graph, c)) for c in strongly_connected(graph) if len(c) > 1]


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "conic_qp"
    cycles = find_cycles(root)
    for component, cycle in cycles:
        print(f"{len(component)} modules import each other: {', '.join(component)}")
        print("  e.g. " + " -> ".join(cycle))
    if not cycles:
        print(f"no import cycles in {root.name}")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
