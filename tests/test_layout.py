"""The layering holds: libraries never import upward, and no import circle exists anywhere.

Read statically from the source (every `import`, also the lazy ones inside functions and the
`TYPE_CHECKING` ones), so a violation fails here before it can hide behind an import order:

    recipes/   entry points (CLI, demo, study, baselines run)  may import every library
    bench/     the serving benchmark's library                  karma, training, export, service
    export/    ONNX + FAISS bundle writer                       karma, training
    service/   the torch-free HTTP service                      karma
    training/  data, features, model, trainer, evaluation       karma
    karma/     the contracts (config, errors, names, bundle)    nothing of the above
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

ALLOWED = {
    "karma": set(),
    "training": {"karma"},
    "export": {"karma", "training"},
    "service": {"karma"},
    "bench": {"karma", "training", "export", "service"},
    "recipes": {"karma", "training", "export", "service", "bench"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in ALLOWED:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a name imported from a package counts as the package)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target is not None and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    top = {m: m.split(".")[0] for m in graph}
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if target.split(".")[0] != top[module] and target.split(".")[0] not in ALLOWED[top[module]]
    ]


def test_no_library_imports_upward() -> None:
    graph = import_graph()
    assert len(graph) > 100 and "service.app" in graph["recipes.cli"]  # the walk found the tree and its edges
    assert upward_imports(graph) == []


def test_no_import_circles() -> None:
    assert circles(import_graph()) == []


def test_the_checks_catch_what_they_guard_against() -> None:
    """An upward edge and a circle planted in a copy of the real graph are both found."""
    graph = {module: set(targets) for module, targets in import_graph().items()}
    graph["karma.errors"].add("service.app")  # a contract reaching up into the service
    assert "karma.errors -> service.app" in upward_imports(graph)
    graph["karma.errors"].add("karma.config")
    graph["karma.config"].add("karma.errors")
    assert any({"karma.config", "karma.errors"} <= set(group) for group in circles(graph))
