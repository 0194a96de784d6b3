"""rl stage: the loss mask on real multi-turn episodes, the reward, dynamic sampling, real GRPO
steps that move the weights, resume, and clear errors.

The trainer tests feed the stage scripted episodes (real tool calls and observations, answers
right or wrong by a fixed rule) through the same ``episodes`` hook the agent loop fills, so they
check the RL machinery (tokenizing, masks, advantages, loss, checkpoints) without depending on
what a tiny random model happens to sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coaflow import envs  # noqa: E402
from coaflow.envs import rewards  # noqa: E402
from coaflow.errors import PipelineError  # noqa: E402
from coaflow.schema.render import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from coaflow.stages import rl  # noqa: E402
from coaflow.stages import rl_rollout as R  # noqa: E402
from tests.models import sft_fixtures as fx

tiny_dir, trajectories = fx.tiny_dir, fx.trajectories  # shared fixtures


def episode(task, answer: str) -> list[dict]:
    """A real two-turn kbqa episode: a search call, the tool's real output, an answer."""
    query = " ".join(task.question.split()[-4:])
    obs = envs.call_tool("kbqa", "search", {"query": query})
    return [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": task.question},
        {"role": "assistant", "content": "<think>Search first.</think>", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "search", "arguments": f'{{"query": "{query}"}}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "search", "content": obs},
        {"role": "assistant", "content": f"<answer>{answer}</answer>"},
    ]


def scripted(trainer, tasks):
    """Episodes for a batch: in every other group one episode answers right, the rest wrong
    (so half the groups have reward variance and half have none)."""
    out = []
    for i, t in enumerate(tasks):
        right = (i // trainer.num_generations) % 2 == 0 and i % trainer.num_generations == 0
        gold = t.answer if isinstance(t.answer, str) else t.answer[0]
        msgs = episode(t, gold if right else "nobody")
        out.append((msgs, gold if right else "nobody",
                    {"tool_calls": 1, "tool_errors": 0, "turns": 2}))
    return out


@pytest.fixture(scope="module")
def tasks():
    return envs.make_tasks("kbqa", "rl", 4, seed=0)


def test_tool_tokens_carry_no_loss(tiny_dir, tasks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    msgs = episode(tasks[0], "x")
    enc = R.encode_episode(tok, msgs, None, max_completion_length=4096)
    assert not enc.truncated and len(enc.completion_ids) == len(enc.env_mask)
    text = tok.decode(enc.prompt_ids)
    assert text.endswith("<|im_start|>assistant\n") and tasks[0].question in text
    # Rebuild the completion token by token and split it into model / not-model text.
    model_text = "".join(tok.decode([i]) for i, m in zip(enc.completion_ids, enc.env_mask,
                                                         strict=True) if m)
    other_text = "".join(tok.decode([i]) for i, m in zip(enc.completion_ids, enc.env_mask,
                                                         strict=True) if not m)
    assert msgs[3]["content"] in other_text  # the whole tool observation is masked
    assert "<tool_response>" in other_text and "<tool_response>" not in model_text
    assert "<answer>x</answer>" in model_text and '"name": "search"' in model_text
    assert model_text.count("<|im_end|>") == 2  # the model learns to stop its turns
    assert enc.completion_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.env_mask[-1] == 1
    cut = R.encode_episode(tok, msgs, None, max_completion_length=20)
    assert cut.truncated and len(cut.completion_ids) == 20


def test_reward_is_the_verifier_not_a_proxy(tasks):
    t = tasks[0]
    gold = t.answer if isinstance(t.answer, str) else t.answer[0]
    right = episode(t, gold)
    r = R.episode_rewards("kbqa", gold, t.answer, right)
    assert r["success"] == 1.0 and r["format"] == 1.0
    # the gold answer in a tool observation or in the thoughts earns no success; in a real tool
    # result it is logged as evidence (envs.rewards.evidence; no reward), in an error text or a
    # thought it is nothing
    leaked = episode(t, "nobody")
    leaked[3]["content"] = "No results for 'x'."
    leaked[2]["content"] = f"<think>maybe {gold}</think>"
    assert R.episode_rewards("kbqa", "nobody", t.answer, leaked)["evidence"] == 0.0
    leaked[3]["content"] = f"Error: no page titled {gold!r}."
    assert R.episode_rewards("kbqa", "nobody", t.answer, leaked)["evidence"] == 0.0
    leaked[3]["content"] = f"1. {gold}: a page."
    r = R.episode_rewards("kbqa", "nobody", t.answer, leaked)
    assert r["success"] == 0.0 and r["evidence"] == 1.0
    calc = [{"role": "tool", "content": "15698.81\n"}]
    assert rewards.evidence("calc", "15698.81", calc) == 1.0
    assert rewards.evidence("calc", "15698.8", calc) == 0.0
    # hedging (several candidates in one answer) fails exact match; no answer scores 0
    assert R.episode_rewards("kbqa", f"{gold} or nobody", t.answer, right)["success"] == 0.0
    assert R.episode_rewards("kbqa", None, t.answer, right[:4])["success"] == 0.0
    # two answers are badly formatted even if one is right
    two = right[:4] + [{"role": "assistant", "content": f"<answer>a</answer><answer>{gold}"
                                                        "</answer>"}]
    assert R.episode_rewards("kbqa", gold, t.answer, two)["format"] == 0.0


def test_zero_variance_groups():
    import torch

    adv = torch.tensor([0.0, 0.0, 0.7, -0.7, 0.0, 0.0, 0.0, 0.0])
    assert R.zero_variance_groups(adv, 2).tolist() == [True, False, True, True]


def test_curriculum_prefers_tasks_solved_sometimes(tasks):
    cur = R.Curriculum(tasks, group=4, seed=0)
    never, sometimes, always, unseen = [t.task_id for t in tasks]
    cur.update(never, [0, 0, 0, 0], 0)
    cur.update(sometimes, [1, 0, 0, 0], 0)
    cur.update(always, [1, 1, 1, 1], 0)
    assert {t.task_id for t in cur.pick(2, 5)} == {sometimes, unseen}
    assert cur.summary()["curriculum_mixed"] == 1 and cur.summary()["curriculum_seen"] == 3
    # the newest outcomes weigh more (the policy moved): a task learnt sinks, one now solved
    # sometimes rises; a task rolled out in the last step waits
    cur.update(sometimes, [1, 1, 1, 1], 5)
    cur.update(never, [1, 0, 0, 1], 5)
    assert cur.rate(sometimes) > 0.5
    assert [t.task_id for t in cur.pick(1, 6)] == [unseen]
    assert never in {t.task_id for t in cur.pick(2, 7)}


def make_ctx(root: Path, model_dir, overrides=(), resume=False):
    from coaflow.config import load_config
    from coaflow.contract import Context, Result
    from coaflow.tracking import Tracker

    cfg = load_config("tiny", ["tracking.enabled=false", f"run.workdir={root}",
                               "rl.suites={kbqa: 8}", "rl.tasks_per_step=2",
                               "rl.num_generations=2", "rl.batch_size=4", "rl.save_steps=1",
                               "rl.lr=0.01", "rl.select=false", *overrides])
    out = root / "rl"
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(run_id="test", out=out, run=cfg.run, resume=resume,
                  inputs={"sft": Result(outputs={"model": str(model_dir)})},
                  tracker=Tracker(root, enabled=False))
    return cfg.rl, ctx


def test_groups_without_signal_are_dropped_from_the_batch(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.tasks_per_step=4"])
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    trainer, _, stats = rl.build_trainer(
        cfg, AutoModelForCausalLM.from_pretrained(tiny_dir), tok, None,
        rl.rl_tasks(cfg, 0), tmp_path / "ckpt", 0, scripted, rl.budgets_for(cfg, ctx.input("sft")))
    trainer.model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    batch = trainer._generate_and_score_completions(inputs)
    mask = (batch["completion_mask"] * batch["tool_mask"]).tolist()
    keep = [(i // 2) % 2 == 0 for i in range(8)]  # groups 0 and 2 have a right and a wrong answer
    for row, ids, k in zip(mask, batch["completion_ids"].tolist(), keep, strict=True):
        assert (sum(row) > 0) == k
        if k:  # the tool observation's tokens are masked, the model's are not
            text = tok.decode([i for i, m in zip(ids, row, strict=True) if not m])
            assert "<tool_response>" in text
    assert batch["num_items_in_batch"].item() == sum(map(sum, mask))
    assert trainer._metrics["train"]["groups_dropped"] == [0.5]
    assert stats["success"] == [2 / 8]
    # dropped episodes leave the micro-batch before the forward pass; the loss is the same
    from trl import GRPOTrainer

    trainer.current_gradient_accumulation_steps = 1
    full = GRPOTrainer.compute_loss(trainer, trainer.model, batch)
    lean = trainer.compute_loss(trainer.model, batch)
    assert abs(full.item() - lean.item()) < 1e-5
    assert trainer._metrics["train"]["rows_skipped"] == [4.0]


def test_a_step_without_signal_leaves_the_weights_alone(tmp_path, tiny_dir):
    """After a step with signal, steps whose every group was dropped must not move the policy:
    their gradient is all zero, and AdamW would otherwise re-apply the last step's momentum."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    def first_step_only(trainer, tasks):
        out = scripted(trainer, tasks)
        if trainer.state.global_step == 0:
            return out
        return [(episode(t, "nobody"), "nobody", info) for t, (_, _, info) in zip(tasks, out,
                                                                                   strict=True)]

    snaps = {}

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            snaps[state.global_step] = {k: v.detach().clone()
                                        for k, v in model.state_dict().items()}

    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.max_steps=3", "rl.curriculum=false"])
    res = rl.train(cfg, ctx, callbacks=(Snap(),), episodes=first_step_only)
    hist = [json.loads(x) for x in (ctx.out / "history.jsonl").read_text().splitlines()]
    assert [h["groups_dropped"] for h in hist] == [0.5, 1.0, 1.0]
    start = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert any(not torch.equal(start[k], snaps[1][k]) for k in start)  # step 1 learnt
    for step in (2, 3):
        assert all(torch.equal(snaps[1][k], snaps[step][k]) for k in snaps[1]), step
    final = AutoModelForCausalLM.from_pretrained(res.path("model")).state_dict()
    assert all(torch.equal(snaps[1][k], final[k]) for k in final)


def test_malformed_episodes_carry_no_loss_when_asked(tmp_path, tiny_dir):
    """rl.skip_malformed: an episode with a malformed call (or a void turn) leaves the loss,
    after its reward has counted in its group's baseline; off, it trains like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def sloppy(trainer, tasks):
        out = scripted(trainer, tasks)
        msgs, answer, info = out[1]  # group 0's wrong episode: its call did not parse
        out[1] = (msgs, answer, {**info, "format_errors": 1})
        msgs, answer, info = out[4]  # group 2's right one ended on a void turn
        out[4] = (msgs, answer, {**info, "stop": "no_action"})
        return out

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    for skip, kept in ((False, [0, 1, 4, 5]), (True, [0, 5])):
        cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.tasks_per_step=4",
                                                 f"rl.skip_malformed={str(skip).lower()}"])
        trainer, _, stats = rl.build_trainer(
            cfg, AutoModelForCausalLM.from_pretrained(tiny_dir), tok, None,
            rl.rl_tasks(cfg, 0), tmp_path / "ckpt", 0, sloppy,
            rl.budgets_for(cfg, ctx.input("sft")))
        trainer.model.train()
        batch = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
        mask = (batch["completion_mask"] * batch["tool_mask"]).sum(1).tolist()
        assert [i for i, m in enumerate(mask) if m > 0] == kept
        assert batch["advantages"][1].item() < 0  # the malformed one still set the baseline
        assert stats["malformed"] == [2 / 8]
        if skip:
            assert trainer._metrics["train"]["malformed_skipped"] == [2 / 8]


def test_steps_change_the_weights_and_resume(tmp_path, tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.max_steps=3"])
    with pytest.raises(KeyboardInterrupt):
        rl.train(cfg, ctx, callbacks=(Stop(),), episodes=scripted)
    assert (ctx.out / "checkpoints" / "checkpoint-2").is_dir()
    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.max_steps=3"], resume=True)
    res = rl.train(cfg, ctx, episodes=scripted)
    assert res.metrics["resumed_from_step"] == 2 and res.metrics["global_step"] == 3
    assert 0 < res.metrics["groups_dropped_mean"] < 1
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(res.path("model")).state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2
    assert (ctx.out / "history.jsonl").read_text().count("\n") == 1  # the resumed attempt's step
    assert not (ctx.out / "checkpoints").exists()


def test_max_minutes_is_a_ceiling(tmp_path, tiny_dir):
    """rl.max_minutes: no step starts that would end past it, judged by the last step's length
    (the study compares algorithms at equal minutes)."""
    cfg, ctx = make_ctx(tmp_path, tiny_dir, ["rl.max_steps=3", "rl.max_minutes=0.0001"])
    res = rl.train(cfg, ctx, episodes=scripted)
    assert res.metrics["global_step"] == 1


def test_clear_errors(tmp_path, tiny_dir):
    import shutil

    cfg, _ = make_ctx(tmp_path, tiny_dir, ["rl.suites={kbqa: 1}"])
    with pytest.raises(PipelineError, match="fewer than one step"):
        rl.rl_tasks(cfg, 0)
    cfg, _ = make_ctx(tmp_path, tiny_dir, ["rl.suites={nosuch: 4}"])
    with pytest.raises(PipelineError, match="rl.suites.nosuch: unknown suite"):
        rl.rl_tasks(cfg, 0)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    cfgfile = bare / "tokenizer_config.json"
    import json

    tc = json.loads(cfgfile.read_text())
    tc.pop("chat_template", None)
    cfgfile.write_text(json.dumps(tc))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(PipelineError, match="no chat template"):
        rl.load_policy(bare)
    (bare / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(PipelineError, match="no tool-call support"):
        rl.load_policy(bare)


def test_one_step_with_the_agent_loop_tracked(tmp_path, tiny_dir):
    """The real rollout through the runner with MLflow on: coaflow's agent loop samples whole
    episodes with the live policy and the real kbqa tools, TRL trains on them, and the step's
    rl/* metrics and the rollout table land in the stage's MLflow run."""
    import types

    import mlflow
    from mlflow.tracking import MlflowClient

    from coaflow.config import load_config
    from coaflow.contract import Result
    from coaflow.runner import run_pipeline

    sft = types.SimpleNamespace(NAME="sft", NEEDS=(), RESUMABLE=False, Config=None,
                                run=lambda cfg, ctx: Result(outputs={"model": str(tiny_dir)}))
    cfg = load_config("tiny", [f"run.workdir={tmp_path}", "rl.suites={kbqa: 8}", "rl.select=false",
                               "rl.tasks_per_step=2", "rl.num_generations=2", "rl.max_steps=1",
                               "rl.max_turns=2", "rl.max_new_tokens=24", "rl.temperature=1.5",
                               "rl.sample_rollouts=3"])
    res = run_pipeline(cfg, stages={"sft": sft, "rl": rl}, run_id="r1", log=lambda m: None)["rl"]
    assert res.metrics["global_step"] == 1
    out = Path(res.outputs["model"]).parent
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert rows[0]["model_tokens"] > 0 and 0 < rows[0]["generate_share"] < 1
    samples = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["transcript"].startswith("[user]") for s in samples)
    run = mlflow.search_runs(filter_string="tags.`coaflow.stage` = 'rl'", output_format="list",
                             search_all_experiments=True)[0]
    client = MlflowClient(mlflow.get_tracking_uri())
    # rl/rollout_entropy: the sampling entropy of the rollout (TRL's rl/entropy comes from the
    # loss's forward pass, which a step whose every group was dropped no longer runs)
    for key in ("rl/reward", "rl/success", "rl/rollout_entropy", "rl/groups_dropped",
                "rl/generate_share", "rl/tool_calls", "rl/model_tokens"):
        assert client.get_metric_history(run.info.run_id, key), key
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "rl")]
    assert "rl/rollouts.json" in arts


def test_a_reward_that_raises_names_the_task(tiny_dir, tasks, monkeypatch):
    import types
    from collections import defaultdict

    from transformers import AutoTokenizer

    def broken(*a, **k):
        raise ValueError("bad reference")

    monkeypatch.setattr(R.rewards, "score", broken)
    rollout = R.make_rollout_func(tasks, AutoTokenizer.from_pretrained(tiny_dir), None,
                                  R.RolloutSettings(4096, 1.0), scripted,
                                  defaultdict(list))
    trainer = types.SimpleNamespace(num_generations=2, state=types.SimpleNamespace(global_step=0))
    with pytest.raises(PipelineError, match=f"task {tasks[0].task_id} .*ValueError: bad ref"):
        rollout([tasks[0].question] * 2, trainer)


# --- the vLLM rollout backend against a fake engine ------------------------------------------


class FakeSamplingParams:
    """vllm.SamplingParams' constructor, strictly: a keyword vLLM does not have raises."""

    FIELDS = ("n", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
              "max_tokens", "min_tokens", "logprobs", "skip_special_tokens",
              "include_stop_str_in_output", "repetition_penalty")

    def __init__(self, **kw):
        unknown = set(kw) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword(s) {sorted(unknown)}")
        self.__dict__.update({"n": 1, "temperature": 1.0, "seed": None, "stop_token_ids": None,
                              "max_tokens": 16, "skip_special_tokens": True, **kw})


class FakeLLM:
    """What the backend uses of ``vllm.LLM``: ``generate(prompts, sampling_params, *, use_tqdm,
    lora_request)`` -> one ``RequestOutput`` per prompt whose ``outputs[0]`` has ``text``,
    ``token_ids`` and ``finish_reason``. It searches first and answers once it saw a result;
    like vLLM with ``skip_special_tokens=False`` it keeps the stop token's text."""

    def __init__(self, tokenizer, answer: str):
        self.tok, self.answer, self.calls = tokenizer, answer, []

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None):
        import types

        assert isinstance(sampling_params, FakeSamplingParams)
        assert all(isinstance(p, str) for p in prompts), "vLLM takes text (or token) prompts"
        self.calls.append((list(prompts), sampling_params))
        end = self.tok.convert_ids_to_tokens(sampling_params.stop_token_ids[0])
        outs = []
        for p in prompts:
            if "<tool_response>" in p:
                text = f"<answer>{self.answer}</answer>"
            else:
                text = ('<tool_call>\n{"name": "search", "arguments": {"query": "capital"}}\n'
                        '</tool_call>')
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            ids = ids + [sampling_params.stop_token_ids[0]]
            c = types.SimpleNamespace(index=0, text=text + end, token_ids=ids,
                                      finish_reason="stop", stop_reason=ids[-1],
                                      cumulative_logprob=None, logprobs=None)
            outs.append(types.SimpleNamespace(request_id=str(len(outs)), prompt=p,
                                              outputs=[c], finished=True))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        SamplingParams=FakeSamplingParams, LLM=FakeLLM))


def test_vllm_backend_runs_episodes_through_the_agent_loop(tmp_path, tiny_dir, tasks, fake_vllm):
    import types

    from transformers import AutoTokenizer

    from coaflow import agent

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    task = tasks[0]
    gold = task.answer if isinstance(task.answer, str) else task.answer[0]
    llm = FakeLLM(tok, gold)
    from coaflow.agent.vllm import VLLMColocateBackend

    backend = VLLMColocateBackend(llm, tok)
    trajs = agent.run_episodes(backend, [task], max_turns=3, max_new_tokens=32,
                               temperature=1.0, seed=7, samples=2)
    assert [t.details["stop"] for t in trajs] == ["answer", "answer"]
    assert all(t.outcome.correct and t.details["tool_calls"] == 1 for t in trajs)
    assert all(t.provenance.model == backend.name for t in trajs)
    # two turns, both episodes batched into each generate call, the loop's budgets passed on
    assert [len(p) for p, _ in llm.calls] == [2, 2]
    params = llm.calls[0][1]
    assert (params.max_tokens, params.temperature, params.seed) == (32, 1.0, 7)
    assert params.stop_token_ids == backend.stop_ids and not params.skip_special_tokens
    # the stop token's text is not part of the turn, and the tool schemas reach the prompt
    msgs, answer, info = R.from_trajectory(trajs[0])
    assert answer == gold and "<|im_end|>" not in msgs[-1]["content"]
    assert '"name": "search"' in llm.calls[0][0][0]
    # the rl stage's episodes hook picks this backend for engine vllm and feeds the encoder
    cfg, _ = make_ctx(tmp_path, tiny_dir, ["rl.engine=vllm", "rl.max_turns=3",
                                               "rl.max_new_tokens=32"])
    model = types.SimpleNamespace(training=True, train=lambda mode=True: None,
                                  eval=lambda: None)
    trainer = types.SimpleNamespace(vllm_generation=types.SimpleNamespace(llm=llm),
                                    processing_class=tok, model=model,
                                    state=types.SimpleNamespace(global_step=0))
    from coaflow.contract import Result

    results = rl.agent_episodes(cfg, tiny_dir, 0, rl.budgets_for(cfg, Result()))(
        trainer, [task, task])
    enc = R.encode_episode(tok, results[0][0], None, 4096, R.tools_for(task.suite))
    assert results[0][1] == gold and sum(enc.env_mask) > 0 and not enc.truncated
