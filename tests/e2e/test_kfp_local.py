"""``coaflow run --engine kfp``: the Kubeflow pipeline on kfp.local gives the CLI runner's stages."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

# Every stage on a handful of tasks (~1-2 min on 2 cores): the smoke profile.
SMALL = ["--profile", "smoke"]


@pytest.mark.slow
def test_kfp_local_run_matches_the_cli_runner(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base = [sys.executable, "-m", "coaflow.cli", "run", "--workdir", str(tmp_path), *SMALL]
    kfp = subprocess.run(base + ["--engine", "kfp", "--run-id", "kfp"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert kfp.returncode == 0, kfp.stdout[-3000:] + kfp.stderr[-3000:]
    run_dir = tmp_path / "runs" / "kfp"
    assert (run_dir / "report.html").exists()
    from coaflow.contract import ORDER

    stages = list(ORDER)  # every stage runs as a task
    for s in stages:  # each task's result artifact is a complete stage folder
        assert (run_dir / s).resolve().is_relative_to(tmp_path / "kfp" / "kfp")
        assert (run_dir / s / ".complete").exists()
    sft = json.loads((run_dir / "sft" / "result.json").read_text())
    assert sft["metrics"]["global_step"] == 2
    assert (run_dir / "sft" / sft["outputs"]["model"] / "config.json").exists()

    # the CLI runner on the same config computes the same stage keys: every stage is reused
    cli = subprocess.run(base + ["--run-id", "cli"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    from coaflow.contract import load_stage

    cacheable = [s for s in stages if getattr(load_stage(s), "CACHE", True)]  # not deploy
    assert cli.stdout.count("] cached (") == len(cacheable), cli.stdout
    for s in cacheable:
        assert ((tmp_path / "runs" / "cli" / s / ".complete").read_text()
                == (run_dir / s / ".complete").read_text())

    con = sqlite3.connect(tmp_path / "mlflow.db")
    tagged = con.execute("select r.name from runs r join tags t on t.run_uuid = r.run_uuid "
                         "where t.key = 'coaflow.run_id' and t.value = 'kfp'").fetchall()
    assert sorted(n for (n,) in tagged) == sorted(stages)  # the tasks' MLflow runs carry the run id


@pytest.mark.slow
def test_a_failed_task_ends_the_kfp_run_with_the_stages_exit_code(tmp_path):
    # a teacher whose mistakes slip through, and a gate that wants 95 % of the runs: exit 3
    cmd = [sys.executable, "-m", "coaflow.cli", "run", "--engine", "kfp", "--workdir",
           str(tmp_path), "--run-id", "bad", "--set", "synthesize.suites={kbqa: 8, calc: 4}",
           "--set", "synthesize.mistake_rate=1.0", "--set", "synthesize.unrecovered_rate=0.6",
           "--set", "gate.min_accepted_fraction=0.95", "--set", "gate.data_docs=false",
           "--set", "tracking.enabled=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the KFP pipeline failed at gate (exit 3)" in done.stderr
    assert not (tmp_path / "runs" / "bad" / "sft").exists()  # nothing ran after the gate
    assert (tmp_path / "runs" / "bad" / "gate" / "quarantine.jsonl").exists()
