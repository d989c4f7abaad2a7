"""No import cycle among selftrain's modules (adapters/ counted as selftrain.adapters), lazy imports
inside functions included, and no import from the data layer up into the run-building modules."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"selftrain": REPO / "selftrain", "selftrain.adapters": REPO / "adapters"}


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            if package == "selftrain" and parts[:1] == ["adapters"]:
                continue  # a link to adapters/ in some checkouts
            out[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the selftrain modules it imports. ``from . import x`` of a submodule x is an edge to
    x only (Python imports the package first in any case)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_package) in mods.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert "selftrain.data.segsets" in graph["selftrain.data"] and "selftrain.adapters.registry" in graph[
        "selftrain.adapters.detection"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_data_layer_does_not_import_upwards():
    upper = {"selftrain.build", "selftrain.engine", "selftrain.cli", "selftrain.demo", "selftrain.catalog",
             "selftrain.tasks", "selftrain.phases"}
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("selftrain.data"):
            assert not targets & upper, (name, sorted(targets & upper))
    assert not {t for t in graph["selftrain.tasks"] if t.startswith("selftrain.data.")} - {"selftrain.data.transforms"}
