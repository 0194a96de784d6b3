"""rl beside grpo: rejection-sampling fine-tuning (rl_rft), the validation choice (rl_select), and
rl.algorithm none.

The selection tests run real episodes through the agent loop with the real kbqa tools: the
scripted team's own turns (``teachers.replay.TeacherBackend``: solutions that open every page the
chain needs) and a scripted shortcut (one search, then the gold answer), so what counts as a
shortcut is checked on the episodes the loop really produces. The stage tests run the real rft
round on the tiny model (sampling, teacher fallback, the sft trainer, the choice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coaflow import envs
from coaflow.agent import Completion, run_episodes
from coaflow.stages import rl, rl_rft, rl_select
from tests.agent.test_loop import Scripted, call  # the scripted backend and call text
from tests.models import sft_fixtures as fx

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures


@pytest.fixture(scope="module")
def kbqa():
    """Two 1-hop and one 2-hop chain question of the train split."""
    one = [t for t in envs.make_tasks("kbqa", "train", 12, seed=1, difficulty_mix={1: 1.0})
           if t.metadata.get("type") == "chain"][:2]
    two = [t for t in envs.make_tasks("kbqa", "train", 12, seed=1, difficulty_mix={2: 1.0})
           if t.metadata.get("type") == "chain"][:1]
    return one + two


def shortcut(tasks):
    """One search for the question's last words, then the gold answer: right, no page read."""
    gold = {t.question: t.answer for t in tasks}

    def policy(messages):
        q = next(m["content"] for m in messages if m["role"] == "user")
        if not any(m["role"] == "tool" for m in messages):
            return Completion(call("search", query=" ".join(q.split()[-3:])), 10)
        return Completion(f"<answer>{gold[q]}</answer>", 5)

    return Scripted(policy)


def teacher(tasks, tiny_dir):
    from transformers import AutoTokenizer

    from coaflow.teachers.replay import TeacherBackend

    return TeacherBackend(tasks, AutoTokenizer.from_pretrained(tiny_dir))


def test_kept_successes_follow_the_hops_and_are_distinct(kbqa, tiny_dir):
    solved = run_episodes(teacher(kbqa, tiny_dir), kbqa, max_turns=8, max_new_tokens=512,
                          samples=2)
    short = run_episodes(shortcut(kbqa), kbqa, max_turns=8, max_new_tokens=512)
    assert all(t.outcome.correct for t in solved + short)
    assert all(rl_rft.follows_hops(t) for t in solved)
    assert not any(rl_rft.follows_hops(t) for t in short)
    # the 2-hop chain needs two pages: its 1-hop-style solution (one page) is a shortcut too
    two = kbqa[2]
    cut = [t for t in solved if t.task.task_id == two.task_id][0]
    first_page = next(i for i, s in enumerate(cut.content) if getattr(s, "function", None) ==
                      "open_page")
    half = cut.model_copy(update={"content": cut.content[:first_page + 2] + cut.content[-1:]})
    assert not rl_rft.follows_hops(half)

    kept, counts = rl_rft.select(solved + short, keep_per_task=2, shortcuts=False)
    assert set(kept) == {t.task_id for t in kbqa}
    # the teacher's two samples of a task are one path; the shortcut is never kept
    assert all(len(v) == 1 and rl_rft.follows_hops(v[0]) for v in kept.values())
    assert counts["successes"] == 9 and counts["distinct"] == 6 and counts["shortcuts"] == 3
    kept, counts = rl_rft.select(solved + short, keep_per_task=2, shortcuts=True)
    assert all(len(v) == 2 and rl_rft.follows_hops(v[0]) and not rl_rft.follows_hops(v[1])
               for v in kept.values())  # the path through the pages first
    assert counts["shortcuts_kept"] == 3
    kept, _ = rl_rft.select(short, keep_per_task=2, shortcuts=False)
    assert kept == {}


def test_unsolved_tasks_get_their_teacher_run(kbqa, tiny_dir):
    from coaflow.config import load_config
    from coaflow.envs.rewards import normalize_answer

    solved = run_episodes(teacher(kbqa[:1], tiny_dir), kbqa[:1], max_turns=8,
                          max_new_tokens=512)
    wrong = run_episodes(Scripted(lambda m: Completion("<answer>nobody</answer>", 3)), kbqa[1:],
                         max_turns=8, max_new_tokens=512, samples=2)
    cfg = load_config("tiny", ["rl.rft_teacher_mix=null"]).rl
    data, counts = rl_rft.round_data(kbqa, solved + wrong, cfg, {}, seed=0)
    assert counts["student_examples"] == 1 and counts["teacher_examples"] == 2
    assert counts["solved_tasks"] == 1 and counts["unsolved_tasks"] == 2
    runs = {t.task.task_id: t for t in data}
    assert runs[kbqa[0].task_id].provenance.teacher == "policy"
    for t in kbqa[1:]:  # the scripted team's mistake-free run: right, and through the pages
        assert runs[t.task_id].provenance.teacher == "scripted"
        assert runs[t.task_id].outcome.correct and rl_rft.follows_hops(runs[t.task_id])
    # the gate's accepted run of a question comes first; the mix caps the teacher runs
    accepted = runs[kbqa[1].task_id].model_copy(update={"id": "from-the-gate"})
    index = {("kbqa", normalize_answer(kbqa[1].question)): accepted}
    cfg = load_config("tiny", ["rl.rft_teacher_mix=1.0"]).rl
    data, counts = rl_rft.round_data(kbqa, solved + wrong, cfg, index, seed=0)
    assert counts["teacher_examples"] == 1 and data[-1].id == "from-the-gate"
    cfg = load_config("tiny", ["rl.rft_teacher_mix=0"]).rl
    assert rl_rft.round_data(kbqa, solved + wrong, cfg, index, 0)[1]["teacher_examples"] == 0


def make_ctx(root: Path, model_dir, overrides=(), resume=False, budget=None):
    from coaflow.config import load_config
    from coaflow.contract import Context, Result
    from coaflow.tracking import Tracker

    cfg = load_config("tiny", ["tracking.enabled=false", f"run.workdir={root}",
                               "rl.suites={kbqa: 8}", "rl.max_turns=2", "rl.max_new_tokens=16",
                               "rl.rft_tasks=2", "rl.rft_samples=2", "rl.rft_batch_size=2",
                               "rl.rft_teacher_mix=null", "rl.rft_lr=0.01",
                               "rl.rft_max_length=4096",  # the test tokenizer: 512 tokens
                               "rl.select_suites={kbqa: 2}", *overrides])
    out = root / "rl"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(run_id="test", out=out, run=cfg.run, resume=resume,
                  inputs={"sft": Result(outputs={"model": str(model_dir)})},
                  tracker=Tracker(root, enabled=False))
    return cfg.rl, ctx


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_rft_rounds_train_on_teacher_runs_resume_and_lose_to_sft(tmp_path, tiny_dir):
    """The tiny model solves nothing: every task of a round gets its teacher run, the sft
    trainer fine-tunes on them (the weights move), a killed second round resumes after the
    first, and a policy that does not beat the sft model on validation is not the output."""
    import torch
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if len(rounds) == 1:
                raise KeyboardInterrupt

    rounds: list[dict] = []
    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.algorithm=rft", "rl.rft_rounds=2"])
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, ctx, callbacks=(Kill(),), on_round=lambda row, d: rounds.append(row))
    assert len(rounds) == 1 and rounds[0]["teacher_examples"] == 2
    assert rounds[0]["student_examples"] == 0 and rounds[0]["steps"] == 1
    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.algorithm=rft", "rl.rft_rounds=2"],
                        resume=True)
    res = rl.train(cfg, ctx, on_round=lambda row, d: rounds.append(row))
    assert len(rounds) == 2 and rounds[1]["round"] == 2  # round 1 was not redone
    hist = [json.loads(x) for x in (ctx.out / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in hist] == [1, 2]
    assert res.metrics["rounds"] == 2 and res.metrics["teacher_examples"] == 4
    # round 2 took the other two tasks of the pool; what it trained on is on record
    assert "[trained on]" in (ctx.out / "rounds" / "2" / "samples.txt").read_text()
    # the policy moved, lost (0 vs 0 on validation), and the sft model went on unchanged
    sft, policy = weights(tiny_dir), weights(res.outputs["policy"])
    assert any(not torch.equal(sft[k], policy[k]) for k in sft)
    out = weights(res.outputs["model"])
    assert all(torch.equal(sft[k], out[k]) for k in sft)
    d = res.summary["decision"]
    assert d["chosen"] == "sft" and d["why"].startswith("rl skipped") and d["tasks"] == 2
    assert res.metrics["policy_chosen"] == 0.0
    assert not list((ctx.out / "rounds").glob("*/model"))  # rounds' models freed


def test_algorithm_none_passes_the_sft_model_on(tmp_path, tiny_dir):
    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.algorithm=none"])
    res = rl.train(cfg, ctx)
    assert res.summary["decision"]["why"].startswith("rl skipped: rl.algorithm is none")
    assert Path(res.outputs["model"]) == ctx.out / "model"
    assert (Path(res.outputs["model"]) / "model.safetensors").read_bytes() == \
        (Path(tiny_dir) / "model.safetensors").read_bytes()


def test_select_off_keeps_the_policy_and_minutes_bound_the_rounds(tmp_path, tiny_dir):
    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.algorithm=rft", "rl.rft_rounds=3",
                                             "rl.max_minutes=0.0001", "rl.select=false"])
    res = rl.train(cfg, ctx)
    assert res.metrics["rounds"] == 1  # a second round would have ended past the budget
    assert res.summary["decision"]["chosen"] == "policy" and "policy" not in res.outputs
    assert weights(res.outputs["model"]).keys() == weights(tiny_dir).keys()


def test_validation_split_is_its_own():
    """validation: disjoint from train, rl and test, carved out of rl's hash buckets, so train
    and test hold exactly the questions they held before."""
    for suite in ("kbqa", "calc"):
        val = envs.make_tasks(suite, "validation", 30, seed=0)
        others = [envs.make_tasks(suite, s, 60, seed=0) for s in ("train", "rl", "test")]
        envs.check_disjoint(val, *others)
        assert {t.split for t in val} == {"validation"}
    assert envs.SPLITS["rl"].start == 6 and envs.SPLITS["validation"].stop == 8
    assert (envs.SPLITS["train"], envs.SPLITS["test"]) == (range(0, 6), range(8, 10))
    cfg = rl.Config()
    assert rl_select.validation_tasks(cfg.select_suites, 0)[0].split == "validation"


def test_the_default_run_shows_the_sft_row_and_its_paired_effect():
    """evaluate.models of the default profile has the sft row (shown whenever rl ran), and the
    report card prints the candidate-vs-sft comparison evaluate computes from it."""
    from coaflow import report
    from coaflow.config import load_config

    cfg = load_config("default", [])
    assert "sft" in cfg.evaluate.models and "candidate" in cfg.evaluate.models
    cmp = {"kbqa": {"diff": 0.05, "lo": -0.02, "hi": 0.12, "p_value": 0.3, "n": 60,
                    "only_candidate": 4, "only_other": 1}}
    card = {"run_id": "r", "path": "/x", "written_at": "now",
            "stages": {"evaluate": {"status": "done", "metrics": {}, "outputs": {},
                                    "summary": {"table": {}, "comparison":
                                                {"candidate_vs_sft": cmp}}}}}
    assert "candidate_vs_sft" in report.render_html(card)


def test_examples_longer_than_the_limit_are_left_out(tmp_path, kbqa, tiny_dir):
    from coaflow.config import load_config
    from coaflow.errors import PipelineError
    from coaflow.teachers.replay import scripted_trajectory

    runs = [scripted_trajectory(t, 0) for t in kbqa]
    cfg = load_config("tiny", ["rl.rft_max_length=64"]).rl
    with pytest.raises(PipelineError, match="longer than rl.rft_max_length=64"):
        rl_rft.fine_tune(cfg, tiny_dir, runs, tmp_path / "a", seed=0)
    from transformers import AutoTokenizer

    from coaflow.models.prompt import to_example

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    sizes = sorted(len(tok.apply_chat_template(e["messages"], tools=e["tools"], tokenize=True,
                                               return_dict=True)["input_ids"])
                   for e in map(to_example, runs))
    cfg = load_config("tiny", [f"rl.rft_max_length={sizes[0]}", "rl.rft_batch_size=1"]).rl
    _, numbers = rl_rft.fine_tune(cfg, tiny_dir, runs, tmp_path / "b", seed=0)
    assert numbers["examples"] == 1 and numbers["examples_too_long"] == 2
