"""The scripted teacher and the synthesize stage, on the real environments and tools."""

import random

import pytest

from coaflow.envs import call_tool, make_env, make_tasks
from coaflow.schema import ApiAction, CodeAction, TextObservation, read_trajectories
from coaflow.stages.synthesize import Config, synthesize
from coaflow.teachers import scripted
from coaflow.teachers.log import TeamLog


def run_synth(tmp_path, **kw):
    cfg = Config(**{"suites": {"kbqa": 12, "calc": 10}, "shard_size": 5, **kw})
    return synthesize(cfg, tmp_path / "out", seed=0, progress=False)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    res = run_synth(out)
    return res, list(read_trajectories(res.outputs["trajectories"]))


def test_writes_valid_trajectories_for_both_suites(synth):
    res, trajs = synth
    assert res.metrics["trajectories"] + res.metrics["failed_attempts"] == 22
    assert {t.task.suite for t in trajs} == {"kbqa", "calc"}
    assert res.metrics["teacher_success_rate"] > 0.6
    roles = {s.agent for t in trajs for s in t.content if hasattr(s, "agent")}
    assert {"planner", "searcher", "coder", "critic", "verifier", "answerer"} <= roles


def test_every_observation_came_from_running_the_tool(synth):
    _, trajs = synth
    envs = {s: make_env(s, seed=0) for s in ("kbqa", "calc")}
    for t in trajs:
        calls = {s.tool_call_id: s for s in t.content if isinstance(s, (ApiAction, CodeAction))}
        for obs in (s for s in t.content if isinstance(s, TextObservation) and s.tool_call_id):
            call = calls[obs.tool_call_id]
            tool, args = ("python", {"code": call.content}) if isinstance(call, CodeAction) \
                else (call.function, call.kwargs)
            assert call_tool(t.task.suite, tool, args, env=envs[t.task.suite]) == obs.content


def test_correct_answers_are_read_from_observations(synth):
    _, trajs = synth
    for t in trajs:
        if t.outcome.correct:
            seen = " ".join(s.content for s in t.content if isinstance(s, TextObservation) and
                            s.tool_call_id)
            assert t.outcome.final_answer in seen


def test_teacher_never_reads_the_reference_answer():
    tasks = make_tasks("kbqa", "train", 6, seed=0) + make_tasks("calc", "train", 6, seed=0)
    envs = {s: make_env(s, seed=0) for s in ("kbqa", "calc")}
    for task in tasks:
        answers = []
        for ref in (task.answer, "a decoy reference"):
            blind = task.model_copy(update={"answer": ref})
            log = TeamLog(task=blind, env=envs[task.suite], suite=task.suite)
            answers.append(scripted.solve(blind, log, random.Random(1), scripted.Mistakes(0, 0)))
        assert answers[0] == answers[1]


def test_mistakes_are_caught_or_slip_through_as_configured(tmp_path):
    caught = run_synth(tmp_path / "a", mistake_rate=1.0, unrecovered_rate=0.0)
    trajs = list(read_trajectories(caught.outputs["trajectories"]))
    assert caught.metrics["recovered"] >= 0.7 * len(trajs)  # a vague query can still hit
    assert all(t.outcome.correct for t in trajs)
    slipped = run_synth(tmp_path / "b", mistake_rate=1.0, unrecovered_rate=1.0)
    assert slipped.metrics["teacher_success_rate"] < 0.5


def test_resume_skips_written_tasks_and_writes_no_duplicates(tmp_path):
    first = run_synth(tmp_path)
    traj_dir = tmp_path / "out" / "trajectories"
    shards = sorted(traj_dir.glob("*.jsonl"))
    shards[-1].rename(shards[-1].with_name(shards[-1].name + ".tmp"))  # as if killed mid-shard
    again = run_synth(tmp_path)
    ids = [t.id for t in read_trajectories(traj_dir)]
    assert len(ids) == len(set(ids)) == first.metrics["trajectories"]
    assert 0 < again.metrics["solved_now"] < 22
    assert not list(traj_dir.glob("*.tmp"))


def test_unknown_suite_for_scripted_teacher_is_a_failed_attempt(tmp_path):
    from coaflow.schema import Task

    log = TeamLog(task=Task(suite="web", task_id="w", question="?"), env=None, suite="web")
    with pytest.raises(ValueError, match="scripted teacher knows suites"):
        scripted.solve(log.task, log, random.Random(0), scripted.Mistakes())


def test_threads_change_nothing_but_the_clock(tmp_path):
    """synthesize.workers solves tasks in threads; the trajectories (order, steps, answers,
    mistakes) are the same as one worker's, only the timestamps differ."""
    import json
    import re

    def load(workers):
        run_synth(tmp_path / str(workers), suites={"kbqa": 8, "calc": 6}, workers=workers)
        rows = [t.model_dump(mode="json") for t in read_trajectories(
            tmp_path / str(workers) / "out" / "trajectories")]
        return re.sub(r'"\d{4}-\d\d-\d\dT[\d:.]+Z?"', '"<time>"', json.dumps(rows, sort_keys=True))

    assert load(1) == load(4)
