"""Issue 32: the fan-out and shared state, interrupted runs, the cache-hit path, errors of the
tracking store. Each test failed on the code before its fix."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coaflow.errors import EXIT_OK, EXIT_RETRY, EXIT_USER
from tests.test_bad_input import assert_one_error_line, invoke

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _stage(*args) -> list[str]:
    return [sys.executable, "-m", "coaflow.cli", "stage", *map(str, args)]


def _statuses(db: Path, where: str = "") -> list[str]:
    try:
        with sqlite3.connect(db) as con:
            return [s for (s,) in con.execute(f"select status from runs {where}")]
    except sqlite3.Error:  # not created yet
        return []


# --- 1. shards starting at once on a new workdir ----------------------------------------------

def test_concurrent_first_stages_on_a_new_workdir_all_succeed(tmp_path):
    """KFP's ParallelFor and Airflow's ``.expand()`` start every synthesize shard at once; the
    first of them create the MLflow store. Before: one died of "duplicate column name: step"
    or "table ... already exists" (3 of 3 tries with two shards)."""
    work, n = tmp_path / "new", 3
    procs = [subprocess.Popen(_stage("synthesize", "--config", "smoke", "--set",
                                     f"run.workdir={work}", "--set", f"synthesize.shards={n}",
                                     "--set", f"synthesize.shard={i}", "--out",
                                     tmp_path / f"s{i}"),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(n)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [EXIT_OK] * n, [o[-2000:] for o in outs]
    assert _statuses(work / "mlflow.db") == ["FINISHED"] * n
    with sqlite3.connect(work / "mlflow.db") as con:
        names = [n for (n,) in con.execute("select name from experiments")]
    assert len(names) == len(set(names)) == 2  # MLflow's Default and the run's, once


# --- 4. a sharded input is every shard of one run, or refused naming the shard ------------------

NO_TRACKING = ["--config", "smoke", "--set", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """S0, S1, S2: the three shards of one smoke run; F1: shard 1 of a run with another seed;
    F2: shard 2 of a run with other suites."""
    root = tmp_path_factory.mktemp("shards")
    made = {f"S{i}": [f"synthesize.shard={i}"] for i in range(3)}
    made["F1"] = ["synthesize.shard=1", "run.seed=7"]
    made["F2"] = ["synthesize.shard=2", "synthesize.suites={kbqa: 12, calc: 3}"]
    for name, sets in made.items():
        res = invoke("stage", "synthesize", *NO_TRACKING, "--set", f"run.workdir={root / 'w'}",
                     "--set", "synthesize.shards=3", *[x for s in sets for x in ("--set", s)],
                     "--out", root / name)
        assert res.exit_code == EXIT_OK, res.output
    return root


@pytest.mark.parametrize("given,bad", [(["S1"], "S1"), (["S0", "F1", "S2"], "F1"),
                                        (["S0", "S1", "F2"], "F2"), (["F2", "S1", "S0"], "F2"),
                                        (["S0", "S1", "S1"], "")])
def test_a_shard_set_that_is_not_one_whole_run_is_refused(shards, tmp_path, given, bad):
    res = invoke("stage", "gate", *NO_TRACKING, "--set", f"run.workdir={tmp_path / 'w'}",
                 "--out", tmp_path / "gate",
                 *[x for g in given for x in ("--input", f"synthesize={shards / g}")])
    assert res.exit_code == EXIT_USER, res.output
    assert_one_error_line(res, "input synthesize", *([str(shards / bad)] if bad else ["once"]))
    assert not (tmp_path / "gate").exists()


def test_every_shard_of_one_run_is_read_in_index_order(shards, tmp_path):
    res = invoke("stage", "gate", *NO_TRACKING, "--set", f"run.workdir={tmp_path / 'w'}",
                 "--out", tmp_path / "gate",
                 *[x for g in ("S2", "S0", "S1") for x in ("--input", f"synthesize={shards / g}")])
    assert res.exit_code == EXIT_OK, res.output


# --- 14. a stage killed by SIGKILL: its MLflow run is closed when the stage runs again ----------

def test_a_stage_killed_by_sigkill_is_closed_as_killed_when_it_runs_again(tmp_path):
    work, out = tmp_path / "w", tmp_path / "syn"
    argv = _stage("synthesize", "--config", "smoke", "--out", out, "--set", f"run.workdir={work}",
                  "--set", "synthesize.suites={calc: 30}", "--set", "synthesize.shard_size=5",
                  "--set", "synthesize.workers=1")
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 400
        while not (_statuses(work / "mlflow.db") == ["RUNNING"]
                   and any((out / "trajectories").glob("*.jsonl*"))) \
                and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGKILL)  # no finally runs: the run stays RUNNING in MLflow
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert _statuses(work / "mlflow.db") == ["RUNNING"]
    again = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == EXIT_OK, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming an interrupted attempt" in again.stdout
    assert sorted(_statuses(work / "mlflow.db")) == ["FINISHED", "KILLED"]


def test_a_live_stage_run_of_another_folder_is_left_running(tmp_path, monkeypatch):
    """Only a run of the same stage folder whose process is gone is closed: a shard running in
    another folder at the same time (same stage, same run id) keeps its run."""
    from coaflow.tracking import Tracker, process_tag

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = Tracker(tmp_path, experiment="e")
    with t.stage_run("synthesize", "r", folder="/a"):
        other = t.mlflow.active_run().info.run_id
        t.mlflow.set_tag("coaflow.process", process_tag(os.getppid()))  # alive, not this one
        t.mlflow.end_run(status="RUNNING")
    with t.stage_run("synthesize", "r", folder="/b"):
        t.mlflow.end_run(status="RUNNING")  # its process is this one: closed when /b runs again
    with t.stage_run("synthesize", "r", folder="/b"):
        pass
    runs = {r.data.tags["coaflow.folder"] + ":" + r.info.status
            for r in t.mlflow.search_runs(experiment_ids=[t.experiment_id], output_format="list")}
    assert runs == {"/a:RUNNING", "/b:KILLED", "/b:FINISHED"}
    assert t.mlflow.get_run(other).info.status == "RUNNING"


# --- 16. the cache-hit path: a read-only or full --out is one line, and leaves nothing ----------

def _gated(shards: Path, work: Path, out: Path):
    return invoke("stage", "gate", *NO_TRACKING, "--set", f"run.workdir={work}", "--out", out,
                  *[x for g in ("S0", "S1", "S2") for x in ("--input", f"synthesize={shards / g}")])


@pytest.fixture
def done_gate(shards, tmp_path) -> Path:
    """A completed gate under workdir ``tmp_path/w``: the same gate elsewhere is a cache hit."""
    assert _gated(shards, tmp_path / "w", tmp_path / "first").exit_code == EXIT_OK
    return tmp_path / "w"


def test_a_cache_hit_into_a_read_only_folder_is_one_line(shards, done_gate, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and ext2/3/4)")
    try:
        res = _gated(shards, done_gate, parent / "g")
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert res.exit_code == EXIT_USER, res.output
    assert_one_error_line(res, str(parent / "g"))
    assert list(parent.iterdir()) == []


def test_a_cache_hit_onto_a_full_disk_is_one_line_and_leaves_nothing(shards, done_gate,
                                                                      tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        res = _gated(shards, done_gate, small / "g")  # hard links cannot cross: copied, and full
        left = sorted(p.name for p in small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert res.exit_code == EXIT_RETRY, res.output
    assert_one_error_line(res, str(small / "g"), "disk is full")
    assert left == []


# --- 17. the tracking store read-only or locked: one line, 2 or 75 -----------------------------

def _synthesize(tmp_path, name: str, *extra) -> subprocess.CompletedProcess:
    """A new process, as in a real run: an engine MLflow already opened is not reopened."""
    return subprocess.run(_stage("synthesize", "--config", "smoke", "--set",
                                 f"run.workdir={tmp_path / 'w'}", "--set",
                                 "synthesize.suites={kbqa: 2}", "--out", tmp_path / name, *extra),
                          env=_env(), capture_output=True, text=True, timeout=600)


def _one_line(res: subprocess.CompletedProcess, *words: str) -> None:
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    for w in words:
        assert w in errors[0], (w, errors[0])


def test_a_read_only_tracking_store_is_one_line_naming_it(tmp_path):
    assert _synthesize(tmp_path, "a").returncode == EXIT_OK
    db = tmp_path / "w" / "mlflow.db"
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and ext2/3/4)")
    try:
        res = _synthesize(tmp_path, "b", "--set", "synthesize.shard_size=7")
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    assert res.returncode == EXIT_USER, res.stderr[-3000:]
    _one_line(res, str(db), "read-only")


def test_a_locked_tracking_store_is_a_retry(tmp_path):
    assert _synthesize(tmp_path, "a").returncode == EXIT_OK
    db = tmp_path / "w" / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("begin exclusive")  # another process holding a write lock
    try:
        res = _synthesize(tmp_path, "b", "--set", "synthesize.shard_size=7")
    finally:
        holder.execute("rollback")
        holder.close()
    assert res.returncode == EXIT_RETRY, res.stderr[-3000:]
    _one_line(res, str(db), "locked")


def test_a_task_count_past_what_can_be_generated_is_refused_before_anything(tmp_path):
    """Before: validation passed and the task list ate memory until MemoryError (15 GB and ten
    minutes with no cap); here the process gets 700 MB, as the data bombs do."""
    from tests.test_reliability import _limited

    rc, out = _limited(["synthesize", "-n", "2000000000", "--output", str(tmp_path / "o")])
    assert rc == EXIT_USER, out[-2000:]
    assert "Traceback" not in out and "MemoryError" not in out
    assert "kbqa: at most 100,000 tasks per suite" in out
    assert not (tmp_path / "o").exists()


# --- 18. coaflow config shows a secret only when asked ------------------------------------------

def test_config_shows_secrets_only_when_asked():
    url = "synthesize.llm.base_url=https://me:pw-secret-18@llm.example/v1"
    res = invoke("config", "--set", url)
    assert res.exit_code == EXIT_OK, res.output
    assert "pw-secret-18" not in res.output and "base_url: https://***@llm.example/v1" in res.output
    res = invoke("config", "--show-secrets", "--set", url)
    assert "base_url: https://me:pw-secret-18@llm.example/v1" in res.output
