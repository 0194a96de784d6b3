"""The layers hold: no two modules of coaflow import each other (through any chain, lazy imports
included), the stage contract imports nothing above ``errors``, and only the top reaches the
runner, the engines and the stages (docs/design.md, "The layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in (SRC / "coaflow").rglob("*.py")}


def _owner(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """The coaflow modules ``path`` imports anywhere (function bodies too), except under
    ``if TYPE_CHECKING:``; ``from pkg import sub`` counts as ``pkg.sub``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        else:
            continue
        found |= {o for n in names if n.startswith("coaflow") and (o := _owner(n))}
    return found - {_name(path)}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _importers(target: str) -> set[str]:
    inside = (target, target + ".")
    return {m for m, deps in GRAPH.items() if not m.startswith(inside)
            and any(d == target or d.startswith(target + ".") for d in deps)}


def test_no_module_imports_itself_through_others():
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_contract_stands_on_errors_alone():
    assert GRAPH["coaflow.contract"] <= {"coaflow.errors"}


@pytest.mark.parametrize("target,allowed", [
    ("coaflow.runner", {"coaflow.cli", "coaflow.launch"}),
    ("coaflow.orchestrate", {"coaflow.cli", "coaflow.launch"}),
    ("coaflow.stages", {"coaflow.cli"}),
    ("coaflow.cli", {"coaflow.launch"}),
])
def test_only_the_top_reaches_up(target, allowed):
    assert _importers(target) <= allowed, f"{target} imported by {_importers(target) - allowed}"


def test_the_check_sees_imports():
    """The graph is not empty: the runner imports the contract, the agent the prompt layer."""
    assert "coaflow.contract" in GRAPH["coaflow.runner"]
    assert "coaflow.models.prompt" in GRAPH["coaflow.agent.loop"]
