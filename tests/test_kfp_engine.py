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


def test_a_run_whose_config_has_another_shape_than_the_compiled_one_exits_2(tmp_path, fake_stage,
                                                                            capsys):
    calls, codes = fake_stage
    codes += [0]
    shape = {"shards": 1, "launched": {}}
    with pytest.raises(SystemExit) as e:
        kfp_engine.run_component(
            "synthesize", profile="smoke", overrides=["synthesize.shards=4"], seed=0,
            workdir="", tracking_uri="", retries=0, out=str(tmp_path / "s"), inputs={},
            shape=shape)
    assert e.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert "synthesize.shards=4" in err and "built for synthesize.shards=1" in err
    assert "python -m components.coaflow_pipeline --profile" in err
    kfp_engine.run_component("synthesize", profile="smoke", overrides=[], seed=0, workdir="",
                             tracking_uri="", retries=0, out=str(tmp_path / "s"), inputs={},
                             shape=shape, shard=-1)
    assert len(calls) == 1


def test_a_shard_task_passes_its_index_and_a_fan_in_passes_every_folder(tmp_path, fake_stage):
    calls, codes = fake_stage
    codes += [0, 0]
    kfp_engine.run_component("synthesize", profile="smoke", overrides=[], seed=0, workdir="",
                             tracking_uri="", retries=0, out=str(tmp_path / "s1"), inputs={},
                             shard=1)
    argv = calls[0][0]
    assert "synthesize.shard=1" in argv
    shards = [type("A", (), {"path": f"/a/{i}"})() for i in range(3)]
    kfp_engine.run_component("gate", profile="smoke", overrides=[], seed=0, workdir="",
                             tracking_uri="", retries=0, out=str(tmp_path / "g"),
                             inputs={"synthesize": shards})
    argv = calls[1][0]
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--input"] == [
        "synthesize=/a/0", "synthesize=/a/1", "synthesize=/a/2"]


def test_a_launched_stage_runs_the_trainjob_launcher_with_the_stage_argv(tmp_path, fake_stage,
                                                                         monkeypatch):
    """No ``coaflow stage`` in this pod: ``trainjob.launch`` gets the same folders, overrides
    and run id, with the compiled size and settings; its exit code is the task's."""
    from coaflow.orchestrate import k8s, trainjob

    calls, _ = fake_stage
    seen = []

    def launch(stage, **kw):
        seen.append((stage, kw))
        out = Path(kw["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text('{"metrics": {"loss": 1.0}}')
        return [75, 0][len(seen) - 1]  # the first attempt: a service was down

    monkeypatch.setattr(trainjob, "launch", launch)
    monkeypatch.setenv("COAFLOW_RUN_ID", "kfp-run-9")
    settings = k8s.load().model_dump(mode="json")
    up = type("A", (), {"path": str(tmp_path / "gate")})()
    assert kfp_engine.run_component(
        "sft", profile="tiny", overrides=["sft.nodes=2"], seed=7, workdir="/w",
        tracking_uri="http://mlflow:5000",
        retries=1, out=str(tmp_path / "sft"), inputs={"gate": up}, backoff_s=0.0,
        launch={"nodes": 2, "gpus_per_node": 4, "settings": settings}) == "done"
    assert not [c for c in calls if c[0] != "sleep"]  # no stage process in the launcher pod
    stage, kw = seen[-1]
    assert len(seen) == 2 and stage == "sft"  # exit 75 retried, as a pod's would be
    assert (kw["nodes"], kw["gpus_per_node"], kw["run_id"]) == (2, 4, "kfp-run-9")
    assert kw["inputs"] == {"gate": str(tmp_path / "gate")} and kw["out"] == str(tmp_path / "sft")
    assert kw["overrides"] == ["sft.nodes=2", "run.seed=7", "run.workdir=/w",
                               "tracking.uri=http://mlflow:5000"]  # the run's, to every node
    assert kw["ks"].model_dump(mode="json") == settings


def test_local_results_are_linked_as_stage_folders_shards_as_stage_dash_index(tmp_path):
    """kfp.local's layout (a ParallelFor's tasks under for-loop-N-iteration-I) -> the run's
    folders ``coaflow runs show`` reads: ``synthesize-0``, ``synthesize-1``, ``gate``."""
    run = tmp_path / "kfp" / "coaflow-2026"
    for folder in ("for-loop-2-iteration-0/synthesize", "for-loop-2-iteration-1/synthesize",
                   "gate"):
        (run / folder / "result").mkdir(parents=True)
    links = kfp_engine.link_results(tmp_path / "kfp", tmp_path / "runs" / "r")
    assert sorted(links) == ["gate", "synthesize-0", "synthesize-1"]
    assert (tmp_path / "runs" / "r" / "synthesize-1").resolve() == \
        run / "for-loop-2-iteration-1" / "synthesize" / "result"
