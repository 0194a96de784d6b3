"""The README's run command, for real: every stage on the tiny profile, then a cache hit."""

import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tiny_pipeline_learns_and_reruns_from_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with socket.socket() as s:  # deploy serves the champion: on a free port, stopped at the end
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "coaflow.cli", "run", "--workdir", str(tmp_path),
           "--set", f"deploy.port={port}", "--run-id", "e2e"]
    try:
        _run_twice(cmd, env, tmp_path)
    finally:
        subprocess.run([sys.executable, "-m", "coaflow.cli", "undeploy", "--workdir",
                        str(tmp_path)], env=env, capture_output=True, timeout=120)


def _run_twice(cmd, env, tmp_path):
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    run_dir = tmp_path / "runs" / "e2e"
    result = {s: json.loads((run_dir / s / "result.json").read_text())
              for s in ("synthesize", "gate", "sft", "evaluate")}
    assert result["synthesize"]["metrics"]["trajectories"] == 1200
    assert result["gate"]["metrics"]["accepted"] >= 1000
    sft = result["sft"]["metrics"]
    assert sft["train_loss_final"] < sft["train_loss_initial"] / 8  # it really learns
    assert sft["heldout_first_call_well_formed_share"] >= 0.6  # held-out episodes start with a call
    assert sft["heldout_first_call_grounded_share"] >= 0.5  # ... built from the question
    model_dir = result["sft"]["outputs"]["model"]
    assert model_dir.startswith("./"), model_dir  # stored relative to the stage folder
    assert (run_dir / "sft" / model_dir / "config.json").exists()
    table = result["evaluate"]["summary"]["table"]
    assert list(table) == ["base", "candidate", "teacher"]  # no champion registered yet
    assert {s: r["n"] for s, r in table["candidate"].items()} == {"kbqa": 60, "calc": 60}
    assert table["teacher"]["kbqa"]["success"] == table["teacher"]["calc"]["success"] == 1.0
    assert table["base"]["kbqa"]["success"] == table["base"]["calc"]["success"] == 0.0
    assert "evaluation (test split)" in first.stdout  # the table printed when the run ends

    con = sqlite3.connect(tmp_path / "mlflow.db")
    names = sorted(n for (n,) in con.execute("select name from runs"))
    assert names == ["e2e", "evaluate", "gate", "sft", "synthesize"]
    inputs = con.execute("select count(*) from inputs").fetchone()[0]
    assert inputs >= 2  # synthesize and sft datasets logged for lineage

    # a second plain run (a new run id) reuses every stage of the first: cross-run cache
    again = subprocess.run(cmd[:-2], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("] cached (") == 4, again.stdout
