"""The KFP component body: exit codes become retries, a refusal or a failed task."""

import json
from pathlib import Path

import pytest

from coaflow.orchestrate import kfp as kfp_engine


class Metrics:
    def __init__(self):
        self.logged = {}

    def log_metric(self, k, v):
        self.logged[k] = v


@pytest.fixture
def fake_stage(tmp_path, monkeypatch):
    """``coaflow stage`` replaced by a list of exit codes; each call writes a result."""
    calls, codes = [], []

    def call(argv, env):
        calls.append((argv, env))
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(
            {"outputs": {}, "metrics": {"loss": 0.5, "steps": 3}, "summary": {}}))
        return codes.pop(0)

    monkeypatch.setattr(kfp_engine.subprocess, "call", call)
    monkeypatch.setattr(kfp_engine.time, "sleep", lambda s: calls.append(("sleep", s)))
    return calls, codes


def run(tmp_path, retries=2, metrics=None, tracking_uri=""):
    up = type("A", (), {"path": str(tmp_path / "gate")})()
    return kfp_engine.run_component(
        "sft", profile="tiny", overrides=["sft.epochs=1"], seed=7, workdir="/w",
        tracking_uri=tracking_uri, retries=retries, out=str(tmp_path / "pipeline-run" / "sft" / "result"),
        inputs={"gate": up, "rl": None}, metrics=metrics, backoff_s=1.0)


def test_exit_75_is_retried_with_backoff_then_metrics_are_logged(tmp_path, fake_stage):
    calls, codes = fake_stage
    codes += [75, 75, 0]
    metrics = Metrics()
    assert run(tmp_path, metrics=metrics, tracking_uri="http://mlflow:5000") == "done"
    assert [c[1] for c in calls if c[0] == "sleep"] == [1.0, 2.0]
    argv, env = calls[0]
    assert argv[argv.index("stage") + 1] == "sft"
    assert f"gate={tmp_path / 'gate'}" in argv and not any(a.startswith("rl=") for a in argv)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets == ["sft.epochs=1", "run.seed=7", "run.workdir=/w"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert metrics.logged == {"loss": 0.5, "steps": 3.0}


def test_retries_run_out_and_the_task_fails_with_75(tmp_path, fake_stage):
    calls, codes = fake_stage
    codes += [75, 75, 75]
    with pytest.raises(SystemExit) as e:
        run(tmp_path)
    assert e.value.code == 75 and len([c for c in calls if c[0] != "sleep"]) == 3


@pytest.mark.parametrize("code", [1, 2, 3])
def test_other_failures_are_not_retried(tmp_path, fake_stage, code):
    calls, codes = fake_stage
    codes += [code, 0]
    with pytest.raises(SystemExit) as e:
        run(tmp_path)
    assert e.value.code == code and len(calls) == 1
    assert kfp_engine.failed_task(tmp_path) == ("sft", code)  # what run_local exits with


def test_a_refused_promotion_is_a_successful_task_that_says_refused(tmp_path, fake_stage):
    _, codes = fake_stage
    codes += [4]
    assert run(tmp_path) == "refused"
