"""Airflow test helpers: an isolated AIRFLOW_HOME (SQLite) per use, the DAG folder of this tree,
and a run small enough for a 2-core CPU (20 tasks, 2 SFT steps).

Airflow is imported only in subprocesses: its import configures process-wide logging and reads
its config once, which must not leak into the rest of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coaflow.contract import ORDER

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"

# the trigger form's values for a tiny run (it tests the wiring, not the stages): the knobs
# through params, the rest through overrides, for the stages that exist
def _smoke_overrides() -> list[str]:
    """The smoke profile (every stage on a handful of tasks) as ``--set`` lines, the way a person
    types them into the trigger form; the task counts come from ``tasks_per_suite``."""
    import yaml

    profile = yaml.safe_load((ROOT / "src/coaflow/configs/smoke.yaml").read_text())

    def flat(prefix: str, value) -> list[str]:
        if isinstance(value, dict):
            return [o for k, v in value.items() for o in flat(f"{prefix}.{k}", v)]
        return [f"{prefix}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                .removesuffix("\n...").strip()]

    return [o for section, body in profile.items() if section != "base"
            for o in flat(section, body) if not o.startswith("synthesize.suites.")]


SMALL_CONF = {
    "tasks_per_suite": {"kbqa": 16, "calc": 4},
    "seed": 3,
    "overrides": _smoke_overrides() + ["tracking.enabled=false"],
}
SMALL_TASKS = 20


def airflow_env(home: Path, workdir: Path, **extra: str) -> dict[str, str]:
    """Environment for an Airflow process on SQLite in ``home`` that runs this tree's DAG."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW_", "AIRFLOW__", "COAFLOW_AIRFLOW_"))
           and k != "MLFLOW_TRACKING_URI"}
    src = str(ROOT / "src")
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "COAFLOW_AIRFLOW_WORKDIR": str(workdir),
        "COAFLOW_AIRFLOW_SCHEDULE": "none",
        "PYTHONPATH": os.pathsep.join([src, str(ROOT)] + [p for p in
                                       env.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "GX_ANALYTICS_ENABLED": "false",
        "NO_PROXY": "*", "no_proxy": "*",
    })
    env.update(extra)
    return env


def python(code: str, env: dict[str, str], timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON (``_log``: the tail of
    its output, for assertion messages)."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["_log"] = (proc.stdout + proc.stderr)[-6000:]
    return out


@pytest.fixture(scope="session")
def shared_workdir(tmp_path_factory) -> Path:
    """One coaflow workdir for every Airflow run of the session: a later run with the same
    config reuses the earlier stages (the cross-run cache), as on a shared volume."""
    return tmp_path_factory.mktemp("coaflow-work")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go: $COAFLOW_TEST_ARTIFACTS, else a temp folder."""
    path = os.environ.get("COAFLOW_TEST_ARTIFACTS")
    out = Path(path) if path else tmp_path_factory.mktemp("artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def assert_run_succeeded(states: dict[str, str]) -> None:
    """Every stage task succeeded, except the branch's untaken side (skipped)."""
    from coaflow.contract import PROMOTION

    names = list(ORDER)
    cut = names.index(PROMOTION) + 1 if PROMOTION in names else len(names)
    assert all(states[n] == "success" for n in ["configure", *names[:cut]]), states
    assert set(states.values()) <= {"success", "skipped"}, states
