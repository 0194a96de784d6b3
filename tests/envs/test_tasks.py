import pytest

from coaflow import envs
from coaflow.envs import calc


@pytest.mark.parametrize("suite", ["kbqa", "calc"])
def test_make_tasks_deterministic_and_splits_disjoint(suite):
    kw = {"n_entities": 150} if suite == "kbqa" else {}
    a = envs.make_tasks(suite, "train", 40, seed=5, **kw)
    assert a == envs.make_tasks(suite, "train", 40, seed=5, **kw)
    assert a != envs.make_tasks(suite, "train", 40, seed=6, **kw)
    rl = envs.make_tasks(suite, "rl", 30, seed=5, **kw)
    test = envs.make_tasks(suite, "test", 30, seed=5, **kw)
    envs.check_disjoint(a, rl, test)
    qs = [t.question for t in a + rl + test]
    assert len(qs) == len(set(qs))
    assert {t.split for t in rl} == {"rl"} and len({t.task_id for t in a}) == 40


def test_check_disjoint_catches_overlap():
    a = envs.make_tasks("calc", "train", 3)
    leaked = a[0].model_copy(update={"split": "test"})
    with pytest.raises(ValueError, match="'train' and 'test'"):
        envs.check_disjoint(a, [leaked])


def test_difficulty_mix():
    tasks = envs.make_tasks("calc", "train", 20, difficulty_mix={"1": 1, "3": 3})
    levels = [t.difficulty for t in tasks]
    assert levels.count(1) == 5 and levels.count(3) == 15
    with pytest.raises(ValueError, match="difficulty_mix"):
        envs.make_tasks("calc", "train", 2, difficulty_mix={7: 1})


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="known suites: kbqa, calc"):
        envs.make_tasks("nope", "train", 1)
    with pytest.raises(ValueError, match="known splits"):
        envs.make_tasks("calc", "dev", 1)
    with pytest.raises(ValueError, match="unknown options"):
        envs.make_tasks("calc", "train", 1, n_entities=5)
    with pytest.raises(ValueError, match="known suites"):
        envs.get_suite("web")
    with pytest.raises(ValueError, match="fewer"):
        envs.make_tasks("kbqa", "test", 2000, n_entities=20)


def test_calc_answers_match_their_expression_in_the_sandbox():
    """The reference answer is what printing the expression gives, also inside the sandbox."""
    tasks = envs.make_tasks("calc", "test", 30, seed=2)
    for t in tasks:
        assert calc.evaluate(t.metadata["expression"]) == t.answer
        assert ("answer_format" in t.metadata) == ("round(" in t.metadata["expression"])
    code = "\n".join(f"print({t.metadata['expression']})" for t in tasks)
    out = envs.call_tool("calc", "python", {"code": code}).splitlines()
    assert out == [t.answer for t in tasks]
    assert all(envs.rewards.is_correct("calc", o, t.answer) for o, t in zip(out, tasks, strict=True))
