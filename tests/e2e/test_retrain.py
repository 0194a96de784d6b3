"""A scheduled retrain: new data, SFT from the champion in service, the same gate, promoted only
if it wins (the smoke profile, so the stages connect in seconds; learning is the tiny profile's)."""

import os
import subprocess
import sys

import pytest


def _run(work, run_id, *sets):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "coaflow.cli", "run", "--profile", "smoke",
                           "--workdir", str(work), "--run-id", run_id, *args],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_retrain_starts_from_the_champion_and_must_beat_it(tmp_path):
    first = _run(tmp_path, "first")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "promoted to champion (version 1)" in first.stdout

    # another synthesis seed (new data), sft from the champion: an equal model is refused
    again = _run(tmp_path, "retrain", "run.seed=1", "sft.model=champion")
    assert again.returncode == 4, again.stdout[-2000:] + again.stderr[-2000:]
    assert "[sft] starting from models:/coaflow-agent@champion (version 1)" in again.stdout
    assert "promotion refused (version 2): beats_champion" in again.stdout
    assert not (tmp_path / "runs" / "retrain" / "deploy").exists()

    from coaflow.registry import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert reg.champion("coaflow-agent").version == 1  # nothing moved
