"""The runner: cache hit and miss, resume after a kill, MLflow runs in SQLite, no secret logged."""

import sqlite3
import types

import pytest

from coaflow.config import Section
from coaflow.contract import MARKER, PipelineError, Result
from coaflow.runner import list_runs, run_pipeline, show_run


class Cfg(Section):
    n: int = 3
    api_key: str = ""


def make_stage(name, needs=(), resumable=False, calls=None, fail_at=None):
    """A real little stage: writes n lines, one file per line, reading the previous stage's count."""

    def run(cfg, ctx):
        calls.append((name, ctx.resume))
        done = sorted(ctx.out.glob("line-*"))
        start = len(done) if ctx.resume else 0
        assert ctx.resume or not done, "a non-resumable stage must start in an empty folder"
        base = sum(r.metrics["lines"] for r in ctx.inputs.values())
        for i in range(start, cfg.n):
            if fail_at is not None and i == fail_at[0]:
                fail_at[0] = None
                raise KeyboardInterrupt("killed")
            (ctx.out / f"line-{i}").write_text(str(base + i))
        ctx.tracker.log_metrics({"lines": cfg.n})
        return Result(outputs={"dir": str(ctx.out)}, metrics={"lines": cfg.n,
                      "resumed_from": start})

    return types.SimpleNamespace(NAME=name, NEEDS=needs, RESUMABLE=resumable, Config=Cfg, run=run)


def config(workdir, tracking=False, **extra):
    """A Config with two toy sections a, b (tests bring their own stages)."""
    from pydantic import ConfigDict, create_model

    from coaflow.config import RunSection, TrackingSection

    model = create_model("C", __config__=ConfigDict(extra="forbid"), run=(RunSection, ...),
                         tracking=(TrackingSection, ...), profile=(str, "test"),
                         a=(Cfg, Cfg()), b=(Cfg, Cfg()))
    return model(run={"workdir": str(workdir)}, tracking={"enabled": tracking}, **extra)


def test_cache_hit_then_miss_on_config_change(workdir):
    calls = []
    stages = {"a": make_stage("a", calls=calls), "b": make_stage("b", ("a",), calls=calls)}
    r1 = run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert [c[0] for c in calls] == ["a", "b"] and not r1["a"].cached
    r2 = run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert [c[0] for c in calls] == ["a", "b"] and r2["a"].cached and r2["b"].cached
    # b's config changes: only b reruns. a's changes: both rerun (b's input changed).
    run_pipeline(config(workdir, b={"n": 4}), run_id="r", stages=stages, log=lambda *_: None)
    assert [c[0] for c in calls] == ["a", "b", "b"]
    run_pipeline(config(workdir, a={"n": 2}, b={"n": 4}), run_id="r", stages=stages,
                 log=lambda *_: None)
    assert [c[0] for c in calls] == ["a", "b", "b", "a", "b"]
    assert (workdir / "runs/r/b/line-0").read_text() == "2"
    assert not (workdir / "runs/r/a/line-2").exists()  # stale output wiped, not mixed in


def test_code_change_is_a_cache_miss(workdir, tmp_path, monkeypatch):
    """The source is in the key: other code (a changed teacher) never reuses a stage folder."""
    import shutil
    from pathlib import Path

    from coaflow import runner
    from coaflow.digest import source_digest

    src = tmp_path / "pkg"
    shutil.copytree(Path(runner.__file__).parent / "teachers", src)
    before = source_digest(src)
    (src / "__pycache__").mkdir(exist_ok=True)
    (src / "__pycache__" / "x.pyc").write_bytes(b"\0")  # bytecode is not source
    assert source_digest(src) == before
    (src / "scripted.py").write_text((src / "scripted.py").read_text() + "\n# changed\n")
    assert source_digest(src) != before

    calls = []
    stages = {"a": make_stage("a", calls=calls)}
    run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)["a"].cached
    monkeypatch.setattr(runner, "code_digest", lambda: "other-code")
    res = run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert not res["a"].cached and [c[0] for c in calls] == ["a", "a"]


def test_killed_stage_leaves_no_marker_and_restarts_clean(workdir):
    calls, fail = [], [1]
    stages = {"a": make_stage("a", calls=calls, fail_at=fail)}
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert not (workdir / "runs/r/a" / MARKER).exists()
    assert (workdir / "runs/r/a/line-0").exists()
    res = run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert calls == [("a", False), ("a", False)] and res["a"].metrics["resumed_from"] == 0


def test_killed_resumable_stage_resumes(workdir):
    calls, fail = [], [2]
    stages = {"a": make_stage("a", resumable=True, calls=calls, fail_at=fail)}
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    res = run_pipeline(config(workdir), run_id="r", stages=stages, log=lambda *_: None)
    assert calls == [("a", False), ("a", True)] and res["a"].metrics["resumed_from"] == 2
    assert show_run(workdir, "r")["stages"]["a"]["status"] == "done"


def test_only_and_from_use_earlier_results(workdir):
    calls = []
    stages = {"a": make_stage("a", calls=calls), "b": make_stage("b", ("a",), calls=calls)}
    with pytest.raises(PipelineError, match="needs a, which has not completed"):
        run_pipeline(config(workdir), run_id="r", only=["b"], stages=stages, log=lambda *_: None)
    run_pipeline(config(workdir), run_id="r", only=["a"], stages=stages, log=lambda *_: None)
    run_pipeline(config(workdir), run_id="r", start_from="b", stages=stages, log=lambda *_: None)
    assert [c[0] for c in calls] == ["a", "b"]
    assert list_runs(workdir)[0]["stages"] == {"a": "done", "b": "done"}
    with pytest.raises(PipelineError, match="unknown stage 'c'"):
        run_pipeline(config(workdir), only=["c"], stages=stages, log=lambda *_: None)


def test_mlflow_runs_land_in_sqlite_and_no_secret_is_logged(workdir, monkeypatch):
    secret_env = "tok-4b1d-9f0e-secret-value"
    monkeypatch.setenv("TEACHER_API_TOKEN", secret_env)
    openai_key = "sk-live0123456789abcdefXYZ"
    calls = []
    stages = {"a": make_stage("a", calls=calls), "b": make_stage("b", ("a",), calls=calls)}
    cfg = config(workdir, tracking=True, a={"api_key": openai_key},
                 b={"api_key": ""})
    cfg.run.name = f"pipe with {secret_env}"  # a secret pasted into a logged string
    run_pipeline(cfg, run_id="r1", stages=stages, log=lambda *_: None)

    db = workdir / "mlflow.db"
    con = sqlite3.connect(db)
    runs = con.execute("select name, run_uuid from runs").fetchall()
    assert sorted(n for n, _ in runs) == ["a", "b", "r1"]
    parent = [u for n, u in runs if n == "r1"][0]
    children = con.execute("select count(*) from tags where key='mlflow.parentRunId' and value=?",
                           (parent,)).fetchone()[0]
    assert children == 2
    metrics = dict(con.execute("select key, value from latest_metrics where run_uuid=?",
                               (parent,)).fetchall())
    assert metrics["a.lines"] == 3
    params = dict(con.execute("select key, value from params where run_uuid=?", (parent,)))
    assert params["a.api_key"] == "***" and params["a.n"] == "3"
    # Not anywhere: database, artifacts, the run folder.
    blobs = [db.read_bytes()] + [p.read_bytes() for p in workdir.rglob("*") if p.is_file()]
    for secret in (secret_env, openai_key):
        assert not any(secret.encode() in b for b in blobs), secret
