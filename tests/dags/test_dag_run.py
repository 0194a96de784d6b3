"""``dag.test()``: the whole local-mode DAG in one process on SQLite, on a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coaflow.contract import ORDER
from coaflow.orchestrate.airflow import safe_run_id
from tests.dags.conftest import (
    ROOT,
    SMALL_CONF,
    SMALL_TASKS,
    airflow_env,
    assert_run_succeeded,
    python,
)

DAG_TEST = r"""
import json, os, time
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["coaflow_retrain"]
start = time.perf_counter()
run = dag.test(run_conf=json.loads(os.environ["RUN_CONF"]))
print(json.dumps({"state": str(run.state), "run_id": run.run_id,
                  "seconds": round(time.perf_counter() - start, 1),
                  "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}}))
"""


@pytest.mark.slow
def test_dag_test_runs_every_stage_locally(tmp_path, shared_workdir):
    env = airflow_env(tmp_path / "airflow", shared_workdir)
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    out = python(DAG_TEST, {**env, "RUN_CONF": json.dumps(SMALL_CONF)}, timeout=600)
    print(f"dag.test(): {out['seconds']} s")
    assert out["state"] == "success", out
    assert set(out["tasks"]) >= {"configure", *ORDER}
    assert_run_succeeded(out["tasks"])
    run_dir = shared_workdir / "runs" / safe_run_id(out["run_id"])
    synth = json.loads((run_dir / "synthesize" / "result.json").read_text())
    assert synth["metrics"]["trajectories"] == SMALL_TASKS  # the trigger conf reached the stage
    sft = json.loads((run_dir / "sft" / "result.json").read_text())
    assert (run_dir / "sft" / sft["outputs"]["model"] / "config.json").exists()
