"""The stage contract every engine relies on: a key that sees everything a stage reads, resume
only into matching work, cross-run reuse, portable result paths, a set-up that fails clean, the
one entry point (`execute` / `coaflow stage`), optional inputs, exit codes, no leaking state."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import types

import pytest

from coaflow.contract import MARKER, PipelineError, Result, read_result
from coaflow.errors import GateRefused, PromotionRefused, ServiceUnavailable
from coaflow.runner import execute, run_pipeline
from tests.test_runner import Cfg, config, make_stage

quiet = dict(log=lambda *_: None)


def seeded_stage(name, calls, needs=(), optional=()):
    """Writes a file whose content depends on run.seed and on what its inputs hold."""

    def run(cfg, ctx):
        calls.append(name)
        seen = {n: r.path("file").read_text() for n, r in ctx.inputs.items()}
        (ctx.out / "data").mkdir()
        (ctx.out / "data" / "f.txt").write_text(f"{name}:{ctx.run.seed}:{sorted(seen.items())}")
        return Result(outputs={"file": str(ctx.out / "data" / "f.txt")},
                      metrics={"inputs": len(seen)})

    return types.SimpleNamespace(NAME=name, NEEDS=needs, OPTIONAL=optional, RESUMABLE=False,
                                 Config=Cfg, run=run)


def test_run_seed_is_part_of_the_key(workdir):
    calls = []
    stages = {"a": seeded_stage("a", calls), "b": seeded_stage("b", calls, ("a",))}
    run_pipeline(config(workdir), run_id="r", stages=stages, **quiet)
    cfg = config(workdir)
    cfg.run.seed = 3
    res = run_pipeline(cfg, run_id="r", stages=stages, **quiet)
    assert calls == ["a", "b", "a", "b"] and not res["a"].cached
    assert res["a"].path("file").read_text().startswith("a:3:")


def test_resume_only_into_work_of_the_same_key(workdir):
    calls, fail = [], [2]
    stages = {"a": make_stage("a", resumable=True, calls=calls, fail_at=fail)}
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config(workdir, a={"n": 5}), run_id="r", stages=stages, **quiet)
    # another config: the killed attempt's files are not resumed into, they are wiped
    res = run_pipeline(config(workdir, a={"n": 4}), run_id="r", stages=stages, **quiet)
    assert calls == [("a", False), ("a", False)] and res["a"].metrics["resumed_from"] == 0
    assert sorted(p.name for p in (workdir / "runs/r/a").glob("line-*")) == \
        [f"line-{i}" for i in range(4)]


def test_a_second_run_reuses_every_completed_stage(workdir):
    calls = []
    stages = {"a": seeded_stage("a", calls), "b": seeded_stage("b", calls, ("a",))}
    run_pipeline(config(workdir, tracking=True), run_id="r1", stages=stages, **quiet)
    res = run_pipeline(config(workdir, tracking=True), run_id="r2", stages=stages, **quiet)
    assert calls == ["a", "b"] and res["a"].cached and res["b"].cached
    # the new run's folders are complete copies (hard links) that resolve on their own
    assert res["b"].path("file") == workdir / "runs/r2/b/data/f.txt"
    assert res["b"].path("file").read_text() == (workdir / "runs/r1/b/data/f.txt").read_text()
    assert (workdir / "runs/r2/b/cached_from").read_text() == str(workdir / "runs/r1/b")
    con = sqlite3.connect(workdir / "mlflow.db")
    cached = con.execute("select count(*) from tags where key='coaflow.cached'").fetchone()[0]
    assert cached == 2
    # --no-cache redoes the work
    run_pipeline(config(workdir), run_id="r3", stages=stages, use_cache=False, **quiet)
    assert calls == ["a", "b", "a", "b"]
    # a cached folder deleted by hand is not reused
    shutil.rmtree(workdir / "runs/r1")
    shutil.rmtree(workdir / "runs/r3")
    run_pipeline(config(workdir), run_id="r4", stages=stages, **quiet)
    assert calls == ["a", "b", "a", "b"]  # r2 still holds the same key: reused from there


def test_result_paths_are_relative_to_the_stage_folder(workdir, tmp_path):
    calls = []
    stages = {"a": seeded_stage("a", calls)}
    run_pipeline(config(workdir), run_id="r", stages=stages, **quiet)
    stored = json.loads((workdir / "runs/r/a/result.json").read_text())
    assert stored["outputs"]["file"] == "./data/f.txt"
    moved = tmp_path / "elsewhere"
    shutil.copytree(workdir / "runs/r/a", moved)
    assert read_result(moved).path("file").read_text().startswith("a:0")


def test_a_set_up_that_fails_leaves_nothing(workdir):
    stages = {"a": seeded_stage("a", []), "b": seeded_stage("b", [], ("a",))}
    with pytest.raises(PipelineError, match="needs a"):
        run_pipeline(config(workdir, tracking=True), run_id="r", start_from="b", stages=stages,
                     **quiet)
    assert not workdir.exists()


def test_execute_is_the_entry_point_with_optional_inputs(workdir):
    calls = []
    a = seeded_stage("a", calls)
    c = seeded_stage("c", calls, needs=(), optional=("a",))
    cfg = config(workdir)
    alone = execute("c", cfg, workdir / "c1", {}, module=c, **quiet)
    assert alone.metrics["inputs"] == 0
    execute("a", cfg, workdir / "a", {}, module=a, **quiet)
    with_a = execute("c", cfg, workdir / "c2", {"a": workdir / "a"}, module=c, **quiet)
    assert with_a.metrics["inputs"] == 1 and not with_a.cached
    again = execute("c", cfg, workdir / "c2", {"a": workdir / "a"}, module=c, **quiet)
    assert again.cached
    with pytest.raises(PipelineError, match="not a completed stage folder"):
        execute("c", cfg, workdir / "c3", {"a": workdir / "nothing"}, module=c, **quiet)
    b = seeded_stage("b", calls, needs=("a",))
    with pytest.raises(PipelineError, match="needs the output of a"):
        execute("b", cfg, workdir / "b", {}, module=b, **quiet)


def test_a_refused_promotion_is_recorded_complete_and_stops_the_run(workdir):
    def refuse(cfg, ctx):
        raise PromotionRefused("rule min_success: 0.1 < 0.5",
                               result=Result(summary={"promoted": False}))

    calls = []
    stages = {"a": seeded_stage("a", calls),
              "register": types.SimpleNamespace(NAME="register", NEEDS=("a",), Config=Cfg,
                                                run=refuse, CACHE=False),
              "deploy": seeded_stage("deploy", calls, ("register",))}
    with pytest.raises(PromotionRefused) as e:
        run_pipeline(config(workdir), run_id="r", stages=stages, **quiet)
    assert e.value.result.summary == {"promoted": False}
    assert (workdir / "runs/r/register" / MARKER).exists()
    assert not (workdir / "runs/r/deploy").exists() and calls == ["a"]

    # a cacheable register: a second run hits the cached refusal and stops there again
    stages["register"].CACHE = True
    for run_id in ("r2", "r3"):
        with pytest.raises(PromotionRefused, match="min_success"):
            run_pipeline(config(workdir), run_id=run_id, stages=stages, **quiet)
    assert not (workdir / "runs/r3/deploy").exists() and calls == ["a"]


def test_two_trackers_in_one_process_keep_to_their_own_stores(tmp_path):
    from coaflow.tracking import Tracker

    t1, t2 = Tracker(tmp_path / "w1", experiment="e1"), Tracker(tmp_path / "w2", experiment="e2")
    for t in (t1, t2, t1):
        with t.stage_run("s", "r"):
            t.log_metrics({"x": 1})
    n1 = sqlite3.connect(tmp_path / "w1/mlflow.db").execute("select count(*) from runs").fetchone()
    n2 = sqlite3.connect(tmp_path / "w2/mlflow.db").execute("select count(*) from runs").fetchone()
    assert (n1[0], n2[0]) == (2, 1)


def test_tiny_base_is_rebuilt_when_its_sizes_change(tmp_path):
    from coaflow.models.loading import load_model_and_tokenizer
    from coaflow.models.tiny import TinyModel

    corpus = ["hello world 123 search open_page python"] * 20
    small = TinyModel(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    m1, _, _ = load_model_and_tokenizer("tiny", corpus=corpus, out_dir=tmp_path, tiny=small)
    m2, _, _ = load_model_and_tokenizer("tiny", corpus=corpus, out_dir=tmp_path,
                                        tiny=small.model_copy(update={"num_hidden_layers": 2}))
    assert (m1.config.num_hidden_layers, m2.config.num_hidden_layers) == (1, 2)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "coaflow.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("args, needle", [
    (["synthesize", "--suite", "web", "-n", "2", "--output", "X"], "unknown suite 'web'"),
    (["config", "--set", "synthesize.split=dev"], "synthesize.split"),
    (["config", "--set", "synthesize.suites.kbqa=-5"], "0 or more"),
    (["config", "--set", "run.name="], "run.name"),
    (["config", "--set", "run.workdir="], "run.workdir"),
    (["config", "--set", "sft.lr=.inf"], "sft.lr"),
    (["config", "--set", "sft.max_steps=-7"], "sft.max_steps"),
    (["stage", "gate", "--out", "X", "--input", "synthesize"], "expected STAGE=DIR"),
    (["stage", "gate", "--out", "X", "--input", "synthesize=nowhere"], "not a completed stage"),
    (["stage", "nosuch", "--out", "X"], "unknown stage 'nosuch'"),
])
def test_bad_config_and_arguments_exit_2_with_one_line(tmp_path, args, needle):
    p = cli(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "X").exists() and not (tmp_path / "work").exists()


def test_stage_command_runs_a_real_stage_and_caches(tmp_path):
    args = ["stage", "synthesize", "--config", "tiny", "--out", str(tmp_path / "syn"),
            "--set", "synthesize.suites={kbqa: 4, calc: 0}", "--set", f"run.workdir={tmp_path}",
            "--set", "tracking.enabled=false"]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert read_result(tmp_path / "syn").metrics["trajectories"] == 4
    again = cli(*args)
    assert again.returncode == 0 and "cached" in again.stdout


def test_exit_codes_of_the_error_kinds():
    from coaflow.errors import exit_code

    assert [exit_code(e("x")) for e in (PipelineError, GateRefused, ServiceUnavailable)] == \
        [2, 3, 75]
    assert PromotionRefused("x").exit_code == 4


def test_an_unreachable_teacher_exits_75(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = cli("synthesize", "--teacher", "llm", "--suite", "kbqa", "-n", "1", "--output",
            str(tmp_path / "o"), "--set", f"synthesize.llm.base_url=http://127.0.0.1:{port}/v1",
            "--set", "synthesize.llm.timeout_s=2", cwd=tmp_path)
    assert p.returncode == 75 and "cannot reach the teacher endpoint" in p.stderr, p.stderr


def test_scoped_uri_leaves_no_process_wide_tracking_uri(tmp_path, monkeypatch):
    import mlflow

    from coaflow.tracking import scoped_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with scoped_uri(f"sqlite:///{tmp_path / 'other.db'}"):
        assert mlflow.get_registry_uri().endswith("other.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == before
