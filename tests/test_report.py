"""The report card reads what stages left behind: timings, funnel, curves from MLflow."""

import types

from coaflow import report
from coaflow.config import Section
from coaflow.pipeline import Result, run_pipeline
from tests.test_pipeline import config


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
    text = report.render_text(report.collect(workdir / "runs/r"))
    assert "candidate" in text and "[0.40, 0.60]" in text
