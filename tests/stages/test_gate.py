"""The gate stage: in a pipeline after a synthesize stage, standalone from the CLI, and tracked in
MLflow. The synthesize stage here is a stand-in that writes factory trajectories."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from coaflow.config import load_config
from coaflow.contract import MARKER, PipelineError, Result
from coaflow.runner import run_pipeline
from coaflow.schema import ShardWriter, Trajectory, read_trajectories
from coaflow.stages import gate as gate_stage
from tests.gates.factory import batch


def fake_synthesize(n: int = 24, wrong_every: int = 4, extra_lines: tuple = ()):
    def run(cfg, ctx):
        folder = ctx.out / "trajectories"
        with ShardWriter(folder, shard_size=10) as w:
            for t in batch(n, wrong_every=wrong_every):
                w.write(t)
        if extra_lines:
            (folder / "part-99999.jsonl").write_text("\n".join(extra_lines) + "\n")
        return Result(outputs={"trajectories": str(folder)}, metrics={"trajectories": n})

    return types.SimpleNamespace(NAME="synthesize", NEEDS=(), RESUMABLE=False, run=run)


def config(workdir, *overrides, tracking=False):
    return load_config("tiny", [f"run.workdir={workdir}", f"tracking.enabled={str(tracking)}",
                                "gate.decontam_test_tasks=20", *overrides])


def test_gate_in_a_pipeline(tmp_path):
    cfg = config(tmp_path)
    results = run_pipeline(cfg, stages={"synthesize": fake_synthesize(extra_lines=("{broken",)),
                                        "gate": gate_stage}, log=lambda *a: None)
    r = results["gate"]
    assert r.metrics["in"] == 25 and r.metrics["accepted"] == 18
    assert r.metrics["rejected_incorrect"] == 6 and r.metrics["rejected_invalid_json"] == 1
    assert r.metrics["accepted_fraction"] == pytest.approx(18 / 25, abs=1e-4)
    assert r.summary["suites"]["kbqa"] == {"in": 12, "accepted": 12, "rejected": {}}
    assert r.summary["suites"]["calc"]["rejected"] == {"incorrect": 6}
    assert all(r.summary["expectations"].values())
    accepted = list(read_trajectories(r.outputs["accepted"]))
    assert len(accepted) == 18 and all(isinstance(t, Trajectory) and t.outcome.correct
                                       for t in accepted)
    q = [json.loads(x) for x in Path(r.outputs["quarantine"]).read_text().splitlines()]
    assert len(q) == 7 and {tuple(x["reasons"]) for x in q} == {("incorrect",),
                                                               ("invalid_json",)}
    assert all(Path(x["source"]).exists() and x["line"] >= 1 for x in q)
    assert (Path(r.outputs["data_docs"]) / "index.html").exists()
    stage_dir = Path(r.outputs["quarantine"]).parent
    saved = json.loads((stage_dir / "result.json").read_text())
    assert saved["metrics"]["rejected_incorrect"] == 6 and (stage_dir / MARKER).exists()


def test_a_bad_batch_stops_the_pipeline(tmp_path):
    cfg = config(tmp_path, "gate.min_accepted_fraction=0.9")
    with pytest.raises(PipelineError, match=r"min_accepted_fraction .*observed 0\.5"):
        run_pipeline(cfg, run_id="r1", stages={"synthesize": fake_synthesize(wrong_every=2),
                                               "gate": gate_stage}, log=lambda *a: None)
    stage_dir = tmp_path / "runs" / "r1" / "gate"
    assert not (stage_dir / MARKER).exists() and not (stage_dir / "accepted").exists()
    assert (stage_dir / "quarantine.jsonl").exists()


def test_metrics_quarantine_and_data_docs_are_logged_to_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = config(tmp_path, tracking=True)
    run_pipeline(cfg, run_id="tracked", stages={"synthesize": fake_synthesize(),
                                                "gate": gate_stage}, log=lambda *a: None)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`coaflow.stage` = 'gate'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["accepted"] == 18 and run.data.metrics["rejected_incorrect"] == 6
    assert run.data.metrics["suite.kbqa.accepted"] == 12
    client = mlflow.MlflowClient()
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"quarantine.jsonl", "gate_report.json", "data_docs"} <= top
    docs = {a.path for a in client.list_artifacts(run.info.run_id, "data_docs")}
    assert "data_docs/index.html" in docs


def _cli(*args):
    from coaflow.cli import main

    return CliRunner().invoke(main, ["gate", *args], catch_exceptions=False)


def test_standalone_cli_on_any_trajectory_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "some.jsonl"
    src.write_text("\n".join(t.model_dump_json() for t in batch(12, wrong_every=3)) + "\n")
    out = tmp_path / "gated"
    res = _cli("--input", str(src), "--output", str(out), "--set", "gate.decontam_test_tasks=0")
    assert res.exit_code == 0, res.output
    assert "gate: 8/12 accepted (66.7%)" in res.output and "incorrect" in res.output
    assert len(list(read_trajectories(out / "accepted"))) == 8
    assert (out / "quarantine.jsonl").exists() and (out / "data_docs" / "index.html").exists()
    assert not (tmp_path / "work").exists()  # standalone makes no pipeline run


def test_standalone_cli_errors_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    res = _cli("--input", str(tmp_path / "empty.jsonl"), "--output", str(tmp_path / "o"))
    assert res.exit_code == 2 and "empty input" in res.output and "Traceback" not in res.output
    res = _cli("--input", str(tmp_path / "empty.jsonl"))
    assert res.exit_code == 2 and "--input and --output go together" in res.output
    src = tmp_path / "some.jsonl"
    src.write_text("\n".join(t.model_dump_json() for t in batch(4)) + "\n")
    res = _cli("--input", str(src), "--output", str(tmp_path / "o2"),
               "--set", "gate.tokenizer=/nonexistent/tok")
    assert res.exit_code == 2 and "gate.tokenizer: cannot load" in res.output


def test_stage_contract():
    assert gate_stage.NAME == "gate" and gate_stage.NEEDS == ("synthesize",)
    assert gate_stage.RESUMABLE is False
    cfg = load_config("tiny")
    assert isinstance(cfg.gate, gate_stage.Config)
    for name, field in gate_stage.Config.model_fields.items():
        assert field.description, f"gate.{name} has no description"
