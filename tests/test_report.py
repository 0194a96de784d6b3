"""The report card reads what stages left behind: timings, funnel, curves from MLflow."""

import os
import struct
import subprocess
import types
from pathlib import Path

import pytest

from coaflow import report
from coaflow.config import Section
from coaflow.contract import Result
from coaflow.runner import run_pipeline
from tests import requires
from tests.test_runner import config


class C(Section):
    n: int = 3


def stage(name, needs, metrics, summary=None, curve=False):
    def run(cfg, ctx):
        if curve:
            for step in range(5):
                ctx.tracker.log_metrics({"train/loss": 5.0 - step}, step=step)
        return Result(metrics=metrics, summary=summary or {})

    return types.SimpleNamespace(NAME=name, NEEDS=needs, Config=C, run=run)


def test_report_card_has_funnel_eval_decision_and_curves(workdir):
    stages = {
        "synthesize": stage("synthesize", (), {"trajectories": 90, "failed_attempts": 10,
                                              "teacher_success_rate": 0.9}),
        "gate": stage("gate", ("synthesize",), {"accepted": 80, "rejected_incorrect": 10}),
        "sft": stage("sft", ("gate",), {"train_loss_final": 1.0}, curve=True),
        "evaluate": stage("evaluate", ("sft",), {"eval/candidate/kbqa/success": 0.5},
                          {"table": {"candidate": {"kbqa": {"success": 0.5, "lo": 0.4,
                                                            "hi": 0.6, "n": 60}}}}),
        "register": stage("register", ("evaluate",), {},
                          {"promoted": True, "version": 2, "reason": "beats champion"}),
    }
    cfg = config(workdir, tracking=True)
    run_pipeline(cfg, run_id="r", stages=stages, log=lambda *_: None)
    page = (workdir / "runs/r/report.html").read_text()
    assert "promoted to champion (version 2): beats champion" in page
    assert "rejected: incorrect" in page and "<polyline" in page  # funnel and the loss curve
    from mlflow.tracking import MlflowClient  # a link (run id) per stage's MLflow run, real ids

    client = MlflowClient(cfg.tracking.uri or f"sqlite:///{workdir}/mlflow.db")
    ids = {r.data.tags["coaflow.stage"]: r.info.run_id for r in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`coaflow.kind` = 'stage'")}
    assert ids.keys() >= {"sft", "register"}
    assert all(f"MLflow run of {k}: <code>{v}</code>" in page for k, v in ids.items())
    assert "mlflow ui --backend-store-uri sqlite:///" in page
    text = report.render_text(report.collect(workdir / "runs/r"))
    assert "candidate" in text and "[0.40, 0.60]" in text


def test_report_card_renders_in_a_real_browser(workdir, tmp_path):
    """Headless Chromium loads the card and paints it: a screenshot that is not blank."""
    test_report_card_has_funnel_eval_decision_and_curves(workdir)
    out = Path(os.environ.get("COAFLOW_TEST_ARTIFACTS", tmp_path)) / "report-card.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    browser = requires.chromium()
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", "--window-size=1200,1400",
                    (workdir / "runs/r/report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 1400)
    # a painted page compresses far worse than a blank one (a white 1200x1400 PNG is ~6 KB)
    assert len(png) > 30_000, len(png)


def test_eval_rows_read_the_evaluate_table():
    nested = {"evaluate": {"summary": {"table": {
        "candidate": {"kbqa": {"success": 0.61, "lo": 0.48, "hi": 0.72, "n": 60}},
        "base": {"kbqa": {"success": 0.0, "lo": 0.0, "hi": 0.06, "n": 60}}}}}}
    rows = report.eval_rows(nested)
    assert {(r["model"], r["suite"], r["ci95"]) for r in rows} == {
        ("candidate", "kbqa", "[0.48, 0.72]"), ("base", "kbqa", "[0.00, 0.06]")}


def test_the_summary_shows_one_evaluated_episode(tmp_path):
    from coaflow.schema.io import write_jsonl
    from tests.conftest import make_trajectory

    wrong, solved = make_trajectory(1), make_trajectory(2)
    wrong.outcome.correct, solved.outcome.correct = False, True
    (tmp_path / "transcripts").mkdir()
    write_jsonl(tmp_path / "transcripts" / "candidate.jsonl", [wrong, solved])
    stages = {"evaluate": {"outputs": {"transcripts": str(tmp_path / "transcripts")}}}
    lines = report.sample_episode(stages)
    assert "Mira Kolb2" in lines[0]  # the solved one is shown
    assert any(line.startswith("  call   search(") for line in lines)
    assert lines[-1].startswith("  -> solved")
    assert report.sample_episode({}) == []


def test_a_sharded_synthesize_counts_every_shard(tmp_path):
    """An engine that fanned synthesize out leaves ``synthesize-<i>`` folders: the funnel adds
    them up, and synthesize is not reported as not run."""
    import json

    from coaflow.contract import MARKER, RESULT

    run = tmp_path / "runs" / "r"
    for i, (n, failed, rate) in enumerate([(8, 2, 0.7), (10, 0, 0.9)]):
        folder = run / f"synthesize-{i}"
        folder.mkdir(parents=True)
        (folder / RESULT).write_text(json.dumps({"metrics": {
            "trajectories": n, "failed_attempts": failed, "teacher_success_rate": rate}}))
        (folder / MARKER).write_text(f"key-{i}")
    stages = report.collect(run)["stages"]
    assert stages["synthesize"]["status"] == "in 2 shards (below)"
    rows = dict(report.funnel(stages))
    assert rows["tasks attempted"] == 20 and rows["trajectories written"] == 18
    assert rows["teacher success rate"] == pytest.approx((0.7 * 10 + 0.9 * 10) / 20)


def test_names_from_disk_are_escaped_in_the_page(tmp_path):
    """Issue 32: a folder named like markup, under ``runs/`` or in a run, is text on the page,
    never markup (before: a stage folder's name went into an <h3> as it was)."""
    import json
    from html.parser import HTMLParser

    run = tmp_path / "runs" / "<img src=x onerror=alert(2)>"
    odd = run / "<svg onload=alert(3)>"
    gate = run / "gate"
    for folder, outputs in ((odd, {}), (gate, {"data_docs": "/tmp/d'><script>alert(4)</script>"})):
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps({"outputs": outputs, "metrics": {
            "accepted": 1, "<b>metric</b>": 2}, "summary": {}}))
        (folder / ".complete").write_text("key")
    page = report.write(run).read_text()

    class Tags(HTMLParser):
        found: list = []

        def handle_starttag(self, tag, attrs):
            self.found.append((tag, [a for a, _ in attrs]))

    parser = Tags()
    parser.feed(page)
    assert not [t for t in parser.found if t[0] in ("img", "script", "b")], parser.found
    assert not [t for t in parser.found if t[0] == "svg" or any(a.startswith("on") for a in t[1])]
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;svg onload=alert(3)&gt;" in page
