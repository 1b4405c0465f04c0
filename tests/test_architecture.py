"""The package's import graph has no circles: each layer only looks down (engine ← es ← cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import evolm

PACKAGE = Path(evolm.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """evolm module -> the evolm modules it imports anywhere in its body (function-level imports too)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    # importing a package runs its __init__, which is not a dependency of the package's own modules
    return {name: {t for t in deps if not name.startswith(t + ".")} for name, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(import_graph()) == []


def test_the_strategy_knows_nothing_of_language_models_and_the_engine_nothing_of_es():
    graph = import_graph()
    assert graph["evolm.es.strategy"] <= {"evolm.es.noise", "evolm.counter_hash"}
    assert not any(dep.startswith("evolm.es") for name, deps in graph.items() if name.startswith("evolm.engine")
                   for dep in deps)
    assert not any(dep.startswith(("evolm.engine", "evolm.es")) for dep in graph["evolm.tasks.base"])


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_evaluation_and_search_do_not_reach_the_es_package():
    """`evolm evaluate` and `evolm search` read PEFT adapters through adapters.py, not through ES's spaces."""
    graph = import_graph()
    users = [name for name in graph if name == "evolm.evaluation" or name.startswith("evolm.search")]
    assert users and not {(name, dep) for name in users for dep in reachable(graph, name) if dep.startswith("evolm.es")}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen
