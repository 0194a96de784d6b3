"""synthesize in shards (``synthesize.shards``, fanned out by KFP ``ParallelFor`` and Airflow
``.expand()``), merged by the gate: the same accepted set as one synthesize run.

Shard i solves a contiguous slice of the one task list (generated whole from the seed, then
sliced), so the shards in order are the single run's tasks in order; the scripted teacher seeds
each task by its id, so a task's trajectory does not depend on which worker solved it; the gate
reads the shards in index order (whatever order the engine hands them over) and keeps the first
of two duplicates, as it does in one folder."""

import json
import re
from pathlib import Path

import pytest

from coaflow.config import load_config
from coaflow.contract import PipelineError, read_result
from coaflow.orchestrate.command import stage_argv
from coaflow.runner import execute
from coaflow.stages.synthesize import load_tasks, shard_slice

SHARDS = 3
BASE = ["tracking.enabled=false", "synthesize.suites={kbqa: 14, calc: 9}",
        "synthesize.shard_size=4", "gate.min_rows_per_suite=0"]


def _cfg(root: Path, *more: str):
    return load_config("smoke", [*BASE, f"run.workdir={root / 'w'}", *more])


def _accepted(gate_dir: Path) -> list[dict]:
    """The gate's accepted trajectories, in order, with the wall-clock times blanked."""
    folder = read_result(gate_dir).path("accepted")
    lines = [line for f in sorted(folder.iterdir()) for line in f.read_text().splitlines()]
    text = re.sub(r'"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)?"', '"<time>"', "\n".join(lines))
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    log = lambda *_: None  # noqa: E731
    cfg = _cfg(root)
    execute("synthesize", cfg, root / "single", log=log)
    execute("gate", cfg, root / "gate-single", {"synthesize": root / "single"}, log=log)
    shards = []
    for i in range(SHARDS):
        sharded = _cfg(root, f"synthesize.shards={SHARDS}", f"synthesize.shard={i}")
        execute("synthesize", sharded, root / f"shard-{i}", log=log)
        shards.append(root / f"shard-{i}")
    # handed over out of order, as a fan-in may: the gate orders them by their index
    execute("gate", cfg, root / "gate-sharded", {"synthesize": shards[::-1]}, log=log)
    return root, cfg, shards


def test_shard_i_solves_exactly_its_slice_of_the_single_runs_tasks(runs):
    root, cfg, shards = runs
    tasks = [t.task_id for t in load_tasks(cfg.synthesize, cfg.run.seed)]
    solved, runs_seen = [], set()
    for i, folder in enumerate(shards):
        result = read_result(folder)
        info = dict(result.summary["shard"])
        runs_seen.add(info.pop("run"))  # which run the shard is of: the gate refuses a mix
        assert info == {"index": i, "of": SHARDS, "tasks": len(tasks)}
        ids = [json.loads(line)["task"]["task_id"]
               for f in sorted((folder / "trajectories").iterdir())
               for line in f.read_text().splitlines()]
        ids += [json.loads(line)["task_id"] for f in sorted((folder / "failed").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
        assert sorted(ids) == sorted(tasks[shard_slice(len(tasks), i, SHARDS)])
        solved += ids
    assert sorted(solved) == sorted(tasks)  # every task once, none twice
    assert len(runs_seen) == 1


def test_the_gate_accepts_the_same_trajectories_from_the_shards_as_from_one_run(runs):
    root, _, _ = runs
    single, sharded = _accepted(root / "gate-single"), _accepted(root / "gate-sharded")
    assert len(single) > 10
    assert [t["id"] for t in sharded] == [t["id"] for t in single]  # same ids, same order
    assert sharded == single  # same content (times blanked)
    a, b = (read_result(root / g) for g in ("gate-single", "gate-sharded"))
    assert a.metrics == {**b.metrics, "wall_seconds": a.metrics["wall_seconds"]}
    report = json.loads((root / "gate-sharded" / "gate_report.json").read_text())
    assert report["input"] == [str(root / f"shard-{i}" / "trajectories") for i in range(SHARDS)]


def test_an_incomplete_set_of_shards_is_refused(runs):
    root, cfg, shards = runs
    with pytest.raises(PipelineError, match=r"shards \[0, 2\] of \[3\]"):
        execute("gate", cfg, root / "gate-bad", {"synthesize": [shards[0], shards[2]]},
                log=lambda *_: None)
    with pytest.raises(PipelineError, match="not all of them are shards"):
        execute("gate", cfg, root / "gate-bad", {"synthesize": [root / "single", shards[1]]},
                log=lambda *_: None)


def test_the_stage_command_names_every_shard_folder_in_order():
    argv = stage_argv("gate", profile="p", out="/o", inputs={"synthesize": ["/s0", "/s1"]})
    assert argv[-4:] == ["--input", "synthesize=/s0", "--input", "synthesize=/s1"]


def test_a_shard_index_past_the_shards_is_a_config_error(tmp_path):
    from coaflow.config import ConfigError

    with pytest.raises(ConfigError, match="shard 3 of 3"):
        _cfg(tmp_path, "synthesize.shards=3", "synthesize.shard=3")
