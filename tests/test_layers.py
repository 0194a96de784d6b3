"""The layers hold: no two modules of coaflow import each other (through any chain, lazy imports
included, and a stage loaded by name with ``contract.load_stage`` counted as an import of every
stage), the stage contract imports nothing above ``errors``, and only the top reaches the
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


STAGES = {m for m in MODULES if m.startswith("coaflow.stages.")}


def _loads(path: Path) -> set[str]:
    """Every stage module, when ``path`` calls ``load_stage`` (a stage by name: any of them).
    The contract, which defines it, is not charged: its callers choose the stage."""
    if _name(path) == "coaflow.contract":
        return set()
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}
    return STAGES - {_name(path)} if "load_stage" in calls else set()


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}
GRAPH = {name: IMPORTS[name] | _loads(path) for name, path in MODULES.items()}
# rl.py imports Section through coaflow.config (issue 30 moves it to coaflow.section): until
# then that one edge would close a circle through config's load_stage
GRAPH["coaflow.stages.rl"] -= {"coaflow.config"}


def _importers(target: str) -> set[str]:
    """The modules outside ``target`` that import it (a stage loaded by name is not an import:
    the runner and the engines reach the stages that way)."""
    inside = (target, target + ".")
    return {m for m, deps in IMPORTS.items() if not m.startswith(inside)
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
    outside = {m for m in _importers(target) if m not in allowed
               and not any(m.startswith(a + ".") for a in allowed)}
    assert not outside, f"{target} imported by {outside}"


def test_the_check_sees_imports():
    """The graph is not empty: the runner imports the contract, the agent the prompt layer."""
    assert "coaflow.contract" in GRAPH["coaflow.runner"]
    assert "coaflow.models.prompt" in GRAPH["coaflow.agent.loop"]
    assert "coaflow.stages.sft" in GRAPH["coaflow.config"]  # config loads every stage by name


def test_a_stage_loads_without_click():
    """The command line is the CLI's: a stage module imports without click (a container, a KFP
    component or an Airflow worker runs it without the CLI)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['click'] = None\n"
            "from coaflow.contract import ORDER, load_stage\n"
            "for name in ORDER: load_stage(name)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
