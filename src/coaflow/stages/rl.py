"""rl: multi-turn agentic RL with real tools (GRPO / DAPO on TRL), from the SFT checkpoint.

\b
    coaflow run --profile tiny                        # sft -> rl -> evaluate
    coaflow run --from rl --run-id RUN --set rl.max_steps=40

Each step draws ``tasks_per_step`` tasks of ``rl.split`` (``rl``: disjoint from train and test;
or ``train``; never test), in pool order or by measured pass rate (``rl.curriculum``), and
runs ``num_generations`` whole episodes per task through coaflow's one agent loop
(``coaflow.agent.run_episodes``) with the live policy and the suites' real tools. An episode is
tokenized with the model's chat template; only the tokens the model sampled carry loss (tool
observations and template scaffolding are masked through TRL's ``env_mask``). The reward is the
suite's verifier on the final ``<answer>`` plus an optional shaped format term
(``rl_rollout.REWARD_DOC``). TRL's ``GRPOTrainer`` computes group-relative advantages and the
clipped policy loss: ``loss_type=dapo`` (token-level), clip-higher (``epsilon_high``), no KL
(``beta=0``) by default; groups whose rewards have zero variance are dropped (DAPO dynamic
sampling, see ``rl_rollout.AgentGRPOTrainer``).

Rollouts: transformers generation in process (CPU or GPU). ``rl.engine: vllm`` turns on TRL's
vLLM colocate engine on a GPU (the qwen3-0.6b-1gpu profile); the agent loop then generates with
it. That path needs a GPU and the ``[gpu]`` extra, so it is not exercised by the CPU tests.

Checkpoints go to ``checkpoints/`` every ``save_steps``; a killed run resumes from the last one.
The final policy is a plain HF folder in ``model/``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from coaflow.config import Section
from coaflow.contract import Context, PipelineError, Result

NAME = "rl"
NEEDS = ("sft",)
OPTIONAL = ("gate",)
RESUMABLE = True


class Config(Section):
    algorithm: Literal["grpo", "rft", "none"] = Field(
        "grpo", description="grpo: group-relative policy optimization on TRL; rft: rounds of "
        "rejection-sampling fine-tuning on the student's own verified successes (rl_rft); none: "
        "no rl, the sft model goes on as the candidate (the stage says so)")
    max_minutes: float | None = Field(None, gt=0, description="wall-time budget of the "
                                      "training: no grpo step or rft round starts that would end "
                                      "past it (judged by the last one's length); null: "
                                      "max_steps / rft_rounds alone")
    suites: dict[str, int] = Field({"kbqa": 64, "calc": 32}, description="tasks per suite of "
                                   "rl.split (the pool steps draw from)")
    split: Literal["rl", "train"] = Field(
        "rl", description="split the task pool comes from: rl (disjoint from train and test) or "
        "train (the questions sft saw; never test)")
    curriculum: bool = Field(False, description="pick each step's tasks by their measured pass "
                             "rate (rl_rollout.Curriculum: tasks solved sometimes first, tallies "
                             "refreshed from every step's rollouts) instead of in pool order")
    rollout_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the rollout copy of the policy (transformers engine): auto "
        "is bfloat16 on a GPU or a CPU with native bf16 kernels; the copy takes the trainer's "
        "weights before every rollout")
    rollout_threads: int = Field(0, ge=0, description="torch CPU threads while generating "
                                 "rollouts (0: torch's default)")
    difficulty_mix: dict[int, float] | None = Field(
        None, description="weights of difficulty levels 1/2/3 in the task pool (null: the "
        "suites' default mix); {1: 1.0} trains on one-hop tasks only")
    max_steps: int = Field(20, ge=1, description="optimizer steps (one batch of episodes each)")
    tasks_per_step: int = Field(4, ge=1, description="tasks per step; each gets "
                                "num_generations episodes")
    num_generations: int = Field(8, ge=2, description="episodes per task (the GRPO group)")
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="TRL loss aggregation: dapo = token-level over the batch")
    epsilon: float = Field(0.2, gt=0, description="lower clip of the importance ratio")
    epsilon_high: float = Field(0.28, gt=0, description="upper clip (DAPO clip-higher)")
    beta: float = Field(0.0, ge=0, description="KL coefficient to the SFT model (0: no "
                        "reference model is kept)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the group's std, the batch's, or not at all")
    dynamic_sampling: bool = Field(True, description="drop groups whose rewards are all equal "
                                   "(zero advantage) from the loss")
    mask_truncated_completions: bool = Field(True, description="no loss on episodes cut at "
                                             "max_completion_length")
    format_weight: float = Field(0.0, ge=0, description="weight of the shaped format reward "
                                 "(0: success only)")
    skip_malformed: bool = Field(False, description="grpo: episodes with a malformed tool call "
                                 "or a void turn (neither a call nor an answer) carry no loss "
                                 "(they still count in their group's advantage baseline)")
    max_turns: int | dict[str, int] | None = Field(
        None, description="assistant turns per episode (one number, one per suite, or null: "
        "derived from the teacher runs sft trained on, as evaluate's; agent.budget)")
    max_new_tokens: int | dict[str, int] | None = Field(
        None, description="tokens per assistant turn (a number, one per suite, or null: derived)")
    tight_budget: bool = Field(False, description="accept an explicit budget that fits fewer "
                               "than 95 % of the teacher's runs (rl inside it can only reward "
                               "shortcuts)")
    max_completion_length: int | None = Field(
        None, ge=16, description="tokens per episode after the prompt (model and tool tokens); "
        "longer ones are cut; null: the budget's turns x (tokens a turn + 256 of tool output)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    lr: float = Field(5e-4, gt=0, description="learning rate (AdamW, constant after warmup)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    batch_size: int = Field(16, ge=1, description="episodes per forward/backward pass "
                            "(gradient accumulation covers the rest of the step)")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="rollout generation: transformers in process, or TRL's vLLM "
        "engine in colocate mode (GPU, the [gpu] extra)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description="GPU share vLLM "
                                               "may take in colocate mode")
    bf16: bool = Field(False, description="bfloat16 mixed precision of the update: on a GPU, or "
                       "on a CPU with native bf16 kernels (AMX / AVX-512 BF16; fp32 elsewhere)")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save "
                                         "memory (TRL's GRPO default is on; off is faster)")
    save_steps: int = Field(5, ge=1, description="checkpoint every N steps (resume point)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    sample_rollouts: int = Field(16, ge=0, description="episodes logged as an MLflow table")
    rft_rounds: int = Field(3, ge=1, description="rft: sample -> keep -> fine-tune rounds")
    rft_tasks: int = Field(16, ge=1, description="rft: pool tasks sampled per round (the pool's "
                           "next ones, in its seeded order)")
    rft_samples: int = Field(4, ge=1, description="rft: episodes per task and round (K)")
    rft_keep_per_task: int = Field(2, ge=1, description="rft: distinct successes kept per task")
    rft_shortcuts: bool = Field(False, description="rft: also train on successes that skipped "
                                "the task's hops (a kbqa answer from a search snippet)")
    rft_teacher_mix: float | None = Field(
        1.0, ge=0, description="rft: teacher runs of tasks the round did not solve, per kept "
        "student episode (0: self-training only; null: every unsolved task's)")
    rft_lr: float = Field(2e-5, gt=0, description="rft: learning rate of a round's fine-tune "
                          "(constant)")
    rft_epochs: int = Field(1, ge=1, description="rft: passes over a round's examples")
    rft_batch_size: int = Field(4, ge=1, description="rft: examples per optimizer step")
    rft_max_length: int = Field(2048, ge=64, description="rft: longest example in tokens "
                                "(longer ones are left out)")
    select: bool = Field(True, description="keep the trained policy only if it beats the sft "
                         "model on the validation split (rl_select); else sft's model goes on")
    select_suites: dict[str, int] = Field({"kbqa": 30, "calc": 30}, description="validation "
                                          "tasks per suite the choice is made on")
    select_margin: float = Field(0.0, description="the policy's paired success gain over all "
                                 "validation tasks must be above this")
    select_max_drop: float = Field(0.05, ge=0, description="... and no suite may lose more")
    select_batch_size: int = Field(32, ge=1, description="validation episodes decoded together")
    nodes: int = Field(1, ge=1, description="GPU nodes (a cluster setting, as sft.nodes)")
    gpus_per_node: int = Field(1, ge=1, description="GPUs (torchrun processes) per node")


def run(cfg: Config, ctx: Context) -> Result:
    return train(cfg, ctx)


def load_policy(model_dir: Path):
    """``(model, tokenizer, template)`` of the sft checkpoint (``rl_rollout.load_policy``)."""
    from coaflow.stages.rl_rollout import load_policy as load

    return load(model_dir)


def rl_tasks(cfg: Config, seed: int) -> list:
    """The task pool (``rl.split``), suites interleaved in a seeded order."""
    from coaflow import envs

    tasks = []
    for suite, n in cfg.suites.items():
        try:
            tasks += envs.make_tasks(suite, cfg.split, n, seed=seed,
                                     difficulty_mix=cfg.difficulty_mix)
        except ValueError as e:
            raise PipelineError(f"rl.suites.{suite}: {e}") from None
    if len(tasks) < cfg.tasks_per_step:
        raise PipelineError(f"rl.suites: {len(tasks)} rl tasks in all, fewer than one step's "
                            f"rl.tasks_per_step={cfg.tasks_per_step}; ask for more tasks")
    random.Random(seed).shuffle(tasks)
    return tasks


def budgets_for(cfg: Config, sft) -> dict:
    """Each suite's budget: the one sft measured on the teacher's runs (``agent.budget``) unless
    ``max_turns`` / ``max_new_tokens`` say otherwise (refused below 95 % of the runs)."""
    from coaflow.agent import budget

    try:
        budgets, _ = budget.resolve(sorted({*cfg.suites, *cfg.select_suites}), budget.read_record(
            sft.outputs.get("budget")), max_turns=cfg.max_turns,
            max_new_tokens=cfg.max_new_tokens, allow_tight=cfg.tight_budget, field="rl")
    except ValueError as e:
        raise PipelineError(str(e)) from None
    return budgets


def completion_length(cfg: Config, budgets: dict) -> int:
    """Tokens an episode may take after its prompt: what its budget lets the model write, plus
    room for the tool output in between."""
    if cfg.max_completion_length is not None:
        return cfg.max_completion_length
    return max(b.max_turns * (b.max_new_tokens + 256) for b in budgets.values())


def agent_episodes(cfg: Config, model_dir: Path, seed: int, budgets: dict):
    """``episodes(trainer, tasks)`` for the rollout: coaflow's agent loop with the live policy
    (the trainer's model itself, or TRL's vLLM engine holding its synced weights)."""
    from coaflow import agent
    from coaflow.models.loading import inference_dtype
    from coaflow.stages import rl_rollout as R

    backend = None

    def episodes(trainer, tasks):
        nonlocal backend
        if backend is None:
            from coaflow.agent.vllm import VLLMColocateBackend

            backend = (VLLMColocateBackend(trainer.vllm_generation.llm, trainer.processing_class)
                       if cfg.engine == "vllm" else
                       agent.TransformersBackend(str(model_dir), batch_size=len(tasks),
                                                 dtype=inference_dtype(cfg.rollout_dtype),
                                                 threads=cfg.rollout_threads or None,
                                                 field="rl: the sft model"))
        if cfg.engine == "transformers":
            sync_policy(backend, trainer.model)  # generate with the policy being trained
        was_training = trainer.model.training
        trainer.model.eval()
        counts = getattr(backend, "stats", None)
        before = dict(counts) if counts else None
        try:
            trajs = agent.run_episodes(
                backend, tasks, budgets=budgets, temperature=cfg.temperature,
                seed=seed * 100_003 + trainer.state.global_step)
        finally:
            trainer.model.train(was_training)
        out = [R.from_trajectory(t) for t in trajs]
        if before is not None and "entropy_sum" in counts:
            # the sampling distribution's entropy over this rollout's tokens, and their count
            n = counts["sampled_tokens"] - before["sampled_tokens"]
            ent = (counts["entropy_sum"] - before["entropy_sum"]) / n if n else float("nan")
            for _, _, info in out:
                info["rollout_entropy"] = ent
                info["rollout_generated"] = (counts["generated_tokens"]
                                             - before["generated_tokens"]) / max(len(out), 1)
        return out

    return episodes


def sync_policy(backend, model) -> None:
    """Point the rollout backend at the live policy: the trainer's model itself when the dtypes
    agree, else the backend's own copy (bf16 rollouts of an fp32 policy) takes its weights."""
    import torch

    model = getattr(model, "module", model)
    if backend.model is model:
        return
    if backend.model.dtype == model.dtype and backend.model.device == model.device:
        backend.model = model
        return
    src = model.state_dict()
    with torch.no_grad():
        for name, p in backend.model.state_dict().items():
            p.copy_(src[name])


def build_trainer(cfg: Config, model, tokenizer, template: str | None, tasks: list,
                  output_dir: Path, seed: int, episodes, budgets: dict, tracker=None,
                  callbacks: tuple = ()):
    """``(trainer, history, stats)``: the GRPO trainer over ``tasks`` with the agent rollout."""
    import os

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from coaflow.stages import rl_rollout as R

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental
    history: list[dict] = []
    stats: dict[str, list] = defaultdict(list)
    settings = R.RolloutSettings(completion_length(cfg, budgets), cfg.temperature)
    shaped = [(R.success_reward, 1.0)] + ([(R.format_reward, cfg.format_weight)]
                                          if cfg.format_weight else [])
    curriculum = R.Curriculum(tasks, cfg.num_generations, seed) if cfg.curriculum else None
    rollout = R.make_rollout_func(tasks, tokenizer, template, settings, episodes, stats,
                                  samples=cfg.sample_rollouts, curriculum=curriculum)
    per_step = cfg.tasks_per_step * cfg.num_generations
    micro = max(g for g in range(1, min(per_step, cfg.batch_size) + 1) if per_step % g == 0)
    use_gpu = torch.cuda.is_available()
    from coaflow.models.loading import cpu_bf16

    args = GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps, learning_rate=cfg.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm, per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro, steps_per_generation=per_step // micro,
        num_generations=cfg.num_generations, loss_type=cfg.loss_type, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high, beta=cfg.beta, scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated_completions,
        max_completion_length=settings.max_completion_length, temperature=cfg.temperature,
        use_vllm=cfg.engine == "vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        reward_weights=[w for _, w in shaped],
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none", seed=seed, data_seed=seed,
        bf16=cfg.bf16 and (use_gpu or cpu_bf16()), gradient_checkpointing=cfg.gradient_checkpointing,
        use_cpu=not use_gpu, disable_tqdm=False,
        dataloader_pin_memory=use_gpu, log_completions=False,
    )

    class LogToTracker(TrainerCallback):
        """TRL's logs plus the rollout's own numbers, as ``rl/*`` metrics per step."""

        def on_step_begin(self, args, state, control, **kw):
            stats["step_start"] = [time.perf_counter()]

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or not state.is_world_process_zero or "reward" not in logs:
                return
            step_s = time.perf_counter() - stats["step_start"][0]
            gen_s = stats["generate_s"][-1] if stats["generate_s"] else 0.0
            scored_s = stats["generate_and_score_s"][-1] if stats["generate_and_score_s"] else gen_s
            row = {**logs, "step": state.global_step, "step_seconds": step_s,
                   "generate_seconds": gen_s, "generate_share": gen_s / step_s if step_s else 0.0,
                   # old/reference log-probs and advantages (0 with beta 0: TRL keeps none)
                   "score_seconds": max(scored_s - gen_s, 0.0),
                   "update_seconds": max(step_s - scored_s, 0.0)}
            for k in ("success", "format", "evidence", "tool_calls", "tool_errors", "turns",
                      "malformed",
                      "model_tokens", "rollout_entropy", "rollout_tokens_per_s", "curriculum_seen", "curriculum_mixed",
                      "curriculum_prior"):
                if stats[k]:
                    row[k] = stats[k][-1]
            history.append(row)
            if tracker is not None:
                tracker.log_metrics({f"rl/{_metric(k)}": float(v) for k, v in row.items()
                                     if isinstance(v, (int, float)) and k != "step"},
                                    step=state.global_step)

    class WallTime(TrainerCallback):
        """Stop when the next step would end past ``rl.max_minutes`` of training (judged by the
        last step's length), so the budget is a ceiling, not a floor."""

        def on_train_begin(self, args, state, control, **kw):
            self.start = self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            step, self.last = now - self.last, now
            if cfg.max_minutes and (now - self.start + step) / 60 > cfg.max_minutes:
                control.should_training_stop = True

    reward_funcs = [f for f, _ in shaped]
    dataset = Dataset.from_list([{"prompt": t.question, "task_id": t.task_id} for t in tasks])
    trainer = R.make_trainer_class()(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
        processing_class=tokenizer, rollout_func=rollout, dynamic_sampling=cfg.dynamic_sampling,
        timings=stats, skip_malformed=cfg.skip_malformed,
        callbacks=[LogToTracker(), WallTime(), *callbacks])
    return trainer, history, stats


def _metric(key: str) -> str:
    return key.replace("rewards/", "reward_").replace("/", "_")


def train(cfg: Config, ctx: Context, callbacks: tuple = (), episodes=None,
          on_round=None) -> Result:
    """The stage; ``callbacks`` are extra ``TrainerCallback``s (tests use one to interrupt; rft
    passes them to every round's fine-tune), ``episodes`` replaces grpo's rollout (tests),
    ``on_round(row, model_dir)`` is called after every rft round (the study's curve)."""
    from coaflow.stages import rl_select

    if cfg.epsilon_high < cfg.epsilon:
        raise PipelineError(f"rl.epsilon_high={cfg.epsilon_high} is below rl.epsilon="
                            f"{cfg.epsilon}: clip-higher needs epsilon_high >= epsilon")
    sft_model = ctx.input("sft").path("model")
    budgets = budgets_for(cfg, ctx.input("sft"))
    summary = {"algorithm": cfg.algorithm, "sft_model": str(sft_model),
               "budget": {s: [b.max_turns, b.max_new_tokens] for s, b in budgets.items()}}
    if cfg.algorithm == "none":
        final, decision = rl_select.finish(
            cfg, ctx, sft_model, None, budgets,
            why="rl skipped: rl.algorithm is none; the sft model is the candidate "
                "(rl.algorithm=rft or grpo trains it; what each gained: docs/rl.md)")
        print(f"[rl] {decision['why']}", flush=True)
        return Result(outputs={"model": str(final)}, metrics={"policy_chosen": 0.0},
                      summary={**summary, "decision": decision})
    start = time.time()
    if cfg.algorithm == "rft":
        policy, metrics, extra = _train_rft(cfg, ctx, sft_model, budgets, callbacks, on_round)
    else:
        policy, metrics, extra = _train_grpo(cfg, ctx, sft_model, budgets, callbacks, episodes)
    metrics["train_seconds"] = round(time.time() - start, 2)
    final, decision = rl_select.finish(cfg, ctx, sft_model, policy, budgets)
    print(f"[rl] {decision['why']}", flush=True)
    metrics["policy_chosen"] = float(decision["chosen"] == "policy")
    for suite, d in decision.get("compare", {}).items():
        metrics[f"validation_{suite}_diff"] = d["diff"]
    if cfg.algorithm == "rft":
        from coaflow.stages.rl_rft import drop_round_models

        drop_round_models(ctx.out)  # the chosen model is in model/ (a losing policy in policy/)
    outputs = {"model": str(final)}
    if decision.get("policy"):
        outputs["policy"] = decision["policy"]
    return Result(outputs=outputs, metrics=metrics,
                  summary={**summary, **extra, "decision": decision})


def _train_grpo(cfg: Config, ctx: Context, sft_model: Path, budgets: dict, callbacks: tuple,
                episodes) -> tuple[Path, dict, dict]:
    from transformers.trainer_utils import get_last_checkpoint

    from coaflow.stages import rl_rollout as R
    from coaflow.stages.sft_trainer import save_final

    model, tokenizer, template = load_policy(sft_model)
    tasks = rl_tasks(cfg, ctx.run.seed)
    ckpt_dir = ctx.out / "checkpoints"
    last = get_last_checkpoint(str(ckpt_dir)) if ctx.resume and ckpt_dir.is_dir() else None
    resumed_from = int(Path(last).name.rsplit("-", 1)[-1]) if last else 0
    trainer, history, stats = build_trainer(
        cfg, model, tokenizer, template, tasks, ckpt_dir, ctx.run.seed,
        episodes or agent_episodes(cfg, sft_model, ctx.run.seed, budgets), budgets,
        tracker=ctx.tracker, callbacks=callbacks)
    ctx.tracker.log_params({"rl.tasks": len(tasks), "rl.reward": R.REWARD_DOC,
                            "rl.sft_model": str(sft_model)})
    trainer.train(resume_from_checkpoint=last)
    final = save_final(trainer, ctx.out / "model")
    (ctx.out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    ctx.tracker.log_artifact(ctx.out / "history.jsonl")
    log_rollouts(ctx, stats["samples"])
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    def mean(key: str) -> float:
        vals = [h[key] for h in history if key in h]
        return sum(vals) / len(vals) if vals else float("nan")

    def edge(key: str, i: int) -> float:
        vals = [h[key] for h in history if key in h]
        return vals[i] if vals else float("nan")

    gen = sum(h.get("generate_seconds", 0.0) for h in history)
    total = sum(h.get("step_seconds", 0.0) for h in history)
    metrics = {
        "reward_mean": mean("reward"), "success_first": edge("success", 0),
        "success_last": edge("success", -1), "success_mean": mean("success"),
        "groups_dropped_mean": mean("groups_dropped"), "tool_calls_mean": mean("tool_calls"),
        "malformed_skipped_mean": mean("malformed_skipped"),
        "seconds_per_step": total / len(history) if history else float("nan"),
        "generate_share": gen / total if total else float("nan"),
        "rollout_seconds_per_step": gen / len(history) if history else float("nan"),
        "score_seconds_per_step": mean("score_seconds"),
        "update_seconds_per_step": mean("update_seconds"),
        "global_step": float(trainer.state.global_step),
        "resumed_from_step": float(resumed_from), "tasks": float(len(tasks)),
    }
    return final, metrics, {"reward": R.REWARD_DOC, "loss_type": cfg.loss_type,
                            "beta": cfg.beta, "dynamic_sampling": cfg.dynamic_sampling,
                            "skip_malformed": cfg.skip_malformed}


def _train_rft(cfg: Config, ctx: Context, sft_model: Path, budgets: dict, callbacks: tuple,
               on_round) -> tuple[Path, dict, dict]:
    from coaflow.stages import rl_rft

    tasks = rl_tasks(cfg, ctx.run.seed)
    ctx.tracker.log_params({"rl.tasks": len(tasks), "rl.sft_model": str(sft_model)})
    policy, history = rl_rft.train(cfg, ctx, sft_model, tasks, budgets, callbacks, on_round)
    (ctx.out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    ctx.tracker.log_artifact(ctx.out / "history.jsonl")

    def total(key: str) -> float:
        return float(sum(h.get(key, 0) for h in history))

    n = max(len(history), 1)
    metrics = {"rounds": float(len(history)), "tasks": float(len(tasks)),
               "success_first": history[0]["success"] if history else float("nan"),
               "success_last": history[-1]["success"] if history else float("nan"),
               "student_examples": total("student_examples"),
               "teacher_examples": total("teacher_examples"),
               "shortcuts": total("shortcuts"),
               "rollout_seconds_per_round": total("rollout_seconds") / n,
               "update_seconds_per_round": total("update_seconds") / n}
    return policy, metrics, {"rounds": [{k: v for k, v in h.items() if k != "model"}
                                        for h in history]}


def log_rollouts(ctx: Context, rows: list[dict]) -> None:
    """Sample episodes of every step: ``rollouts.jsonl`` and an MLflow table."""
    path = ctx.out / "rollouts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if ctx.tracker.enabled and rows:
        ctx.tracker.mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]},
                                     artifact_file="rl/rollouts.json")

