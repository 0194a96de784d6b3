"""The scripted team in its two styles, and its turns replayed through the one agent loop: the
ceiling row of evaluate plays by the rules every student plays by."""

import pytest

from coaflow.agent import category, run_episodes
from coaflow.agent.budget import Budget, derive, teacher_runs
from coaflow.envs import make_tasks
from coaflow.gates.validators import check_tags
from coaflow.teachers.replay import TeacherBackend, scripted_trajectory
from tests.models import sft_fixtures as fx

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures


@pytest.fixture(scope="module")
def tasks():
    return make_tasks("kbqa", "test", 6, seed=0) + make_tasks("calc", "test", 4, seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def calls(traj):
    return [(c.class_, getattr(c, "function", None), getattr(c, "kwargs", None) or c.content)
            for c in traj.tool_calls()]


def test_the_terse_team_makes_the_same_calls_and_answers_in_fewer_tokens(tasks, tok):
    full = [scripted_trajectory(t, 0) for t in tasks]
    terse = [scripted_trajectory(t, 0, terse=True) for t in tasks]
    assert all(t.outcome.correct for t in full + terse)
    for f, t in zip(full, terse, strict=True):
        assert t.outcome.final_answer == f.outcome.final_answer
        assert not check_tags(t)  # still planned before it acts, one answer, balanced tags
        if t.task.suite == "kbqa":  # calc's terse team skips the second computation
            assert calls(t) == calls(f)
        else:
            assert calls(t) == calls(f)[:1]
    shape = {s: teacher_runs([x for x in full if x.task.suite == s], tok) for s in ("kbqa",)}
    short = {s: teacher_runs([x for x in terse if x.task.suite == s], tok) for s in ("kbqa",)}
    longest = [k for _, k in shape["kbqa"]["kbqa"]]
    assert all(k2 < k for (_, k2), k in zip(short["kbqa"]["kbqa"], longest, strict=True))
    assert terse[0].provenance.model == "coaflow-scripted-team-terse"


@pytest.mark.parametrize("terse", [False, True])
def test_replayed_turns_solve_within_the_budget_the_runs_fit_and_are_cut_below_it(
        tasks, tok, terse):
    runs = teacher_runs([scripted_trajectory(t, 0, terse) for t in tasks], tok)
    fair = {s: derive(r) for s, r in runs.items()}
    trajs = run_episodes(TeacherBackend(tasks, tok, 0, terse), tasks, budgets=fair)
    assert [category(t) for t in trajs] == ["solved"] * len(tasks)
    # the loop ran the team's calls for real: the same calls as the team's own run
    assert [calls(t) for t in trajs] == [calls(scripted_trajectory(t, 0, terse)) for t in tasks]
    tight = {s: Budget(b.max_turns, min(k for _, k in runs[s]) - 1) for s, b in fair.items()}
    cut = run_episodes(TeacherBackend(tasks, tok, 0, terse), tasks, budgets=tight)
    assert all(category(t) == "turn_tokens" for t in cut)
    few = {s: Budget(2, b.max_new_tokens) for s, b in fair.items()}
    short = run_episodes(TeacherBackend(tasks, tok, 0, terse), tasks, budgets=few)
    assert {category(t) for t in short if t.task.suite == "kbqa"} == {"max_turns"}
