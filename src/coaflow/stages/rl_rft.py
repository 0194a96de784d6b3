"""rl.algorithm: rft -- rejection-sampling fine-tuning on the student's own verified successes.

A round (``rl.rft_rounds`` of them, or until ``rl.max_minutes``):

1. **Sample**: ``rl.rft_tasks`` tasks of the pool (the next ones in its seeded order), each
   ``rl.rft_samples`` times, from the current policy at ``rl.temperature``, through the one agent
   loop (``agent.run_episodes`` with the transformers backend: all episodes of the round decoded
   together, each keeping its KV cache across turns, the suites' real tools, the run's budget).
2. **Keep** the verified successes (the suite's verifier on the final ``<answer>``, as GRPO's
   reward), one per distinct path (the sequence of tool calls and the answer), none with a
   malformed call, at most ``rl.rft_keep_per_task`` a task, those that follow the task's hops
   first (``follows_hops``: a kbqa answer read from every page the chain needs, a calc answer
   the sandbox computed). A success that skipped the hops (an answer from a search snippet) is a
   shortcut: trained on only with ``rl.rft_shortcuts``.
3. **Teacher runs for the rest**: a task of the round with no kept success gets its teacher run
   (the gate's accepted run of that question, else the scripted team's mistake-free run), up to
   ``rl.rft_teacher_mix`` teacher runs per kept student episode (null: every such task).
4. **Fine-tune** the policy on them with the sft stage's own trainer (``sft_trainer.build_trainer``: the
   same chat rendering, ``assistant_only_loss`` masks, collator and precision), ``rl.rft_epochs``
   passes at ``rl.rft_lr``; the result is the next round's policy.

ReST-meets-ReAct (arXiv 2312.10003) and RFT (arXiv 2308.01825) are the recipe; the reason for it
here is docs/rl.md: GRPO on a 135M student rewarded one shortcut and collapsed onto it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

from coaflow.contract import PipelineError

ROUNDS = "rounds"  # <stage>/rounds/<n>/model: each round's policy; <n>/done when it is whole


# --- which episodes teach -----------------------------------------------------------------------


def path_key(traj) -> str:
    """What makes two solutions different: the tool calls (name and arguments, in order) and the
    final answer; thoughts may differ without making a new path."""
    from coaflow.schema import ApiAction, CodeAction

    calls = []
    for step in traj.content:
        if isinstance(step, CodeAction):
            calls.append(["python", " ".join(step.content.split())])
        elif isinstance(step, ApiAction):
            calls.append([step.function, step.kwargs])
    return json.dumps([calls, traj.outcome.final_answer], sort_keys=True, default=str)


def follows_hops(traj) -> bool:
    """Whether a solution used the tools the task takes, not a shortcut: kbqa opens at least as
    many pages (that opened) as its chain has distinct entities (a 1-hop question: one page, a
    2-hop chain or a comparison: two); calc ran a program that printed something (no error).
    Other suites: any tool result. The scripted teacher's runs all follow their hops
    (tests/stages/test_rl_rft.py checks both on real episodes)."""
    from coaflow.schema import ApiAction, CodeAction, TextObservation

    used: list[str] = []
    last = None
    for step in traj.content:
        if isinstance(step, (ApiAction, CodeAction)):
            last = "python" if isinstance(step, CodeAction) else step.function
        elif isinstance(step, TextObservation) and last is not None:
            if not str(step.content).startswith("Error"):
                used.append(last)
            last = None
    task = traj.task
    if task.suite == "kbqa":
        need = len({h.get("subject") for h in task.metadata.get("hops") or []}) or 1
        return used.count("open_page") >= need
    if task.suite == "calc":
        return "python" in used
    return bool(used)


def select(trajs: list, keep_per_task: int, shortcuts: bool) -> tuple[dict, dict]:
    """``(kept, counts)``: per task id the successes to train on (distinct paths with no
    malformed call; those that follow the hops first, then the shortest), and how many
    successes, distinct paths, shortcuts and malformed ones there were."""
    by_task: dict[str, list] = defaultdict(list)
    for t in trajs:
        by_task[t.task.task_id].append(t)
    kept: dict[str, list] = {}
    counts = {"successes": 0, "distinct": 0, "shortcuts": 0, "shortcuts_kept": 0,
              "malformed": 0}
    for tid, runs in by_task.items():
        wins = [t for t in runs if t.outcome.correct]
        counts["successes"] += len(wins)
        seen, distinct = set(), []
        for t in wins:
            key = path_key(t)
            if key not in seen:
                seen.add(key)
                distinct.append(t)
        counts["distinct"] += len(distinct)
        counts["shortcuts"] += sum(not follows_hops(t) for t in distinct)
        clean = [t for t in distinct if not t.details.get("format_errors")]
        counts["malformed"] += len(distinct) - len(clean)
        pool = clean if shortcuts else [t for t in clean if follows_hops(t)]
        pool.sort(key=lambda t: (not follows_hops(t), t.details.get("turns", 0)))
        if pool[:keep_per_task]:
            kept[tid] = pool[:keep_per_task]
            counts["shortcuts_kept"] += sum(not follows_hops(t) for t in kept[tid])
    return kept, counts


# --- teacher runs -------------------------------------------------------------------------------


def teacher_index(accepted: str | None) -> dict[tuple[str, str], object]:
    """The gate's accepted teacher runs by (suite, normalized question); {} without a gate."""
    if not accepted or not Path(accepted).exists():
        return {}
    from coaflow.envs.rewards import normalize_answer
    from coaflow.schema import read_trajectories

    index = {}
    for t in read_trajectories(accepted):
        if t.outcome.correct is not False:
            index.setdefault((t.task.suite, normalize_answer(t.task.question)), t)
    return index


def teacher_run(task, index: dict, seed: int):
    """The teacher's run of ``task``: the gate's accepted one, else the scripted team's (None
    when neither solves it, e.g. a task file the scripted team has no solver for)."""
    from coaflow.envs.rewards import normalize_answer

    hit = index.get((task.suite, normalize_answer(task.question)))
    if hit is not None:
        return hit
    from coaflow.teachers.replay import scripted_trajectory

    try:
        t = scripted_trajectory(task, seed)
    except (ValueError, KeyError):
        return None
    return t if t.outcome.correct else None


# --- a round ------------------------------------------------------------------------------------


def round_data(tasks: list, trajs: list, cfg, index: dict, seed: int) -> tuple[list, dict]:
    """``(trajectories to train on, counts)`` of one round's episodes."""
    kept, counts = select(trajs, cfg.rft_keep_per_task, cfg.rft_shortcuts)
    student = [t for runs in kept.values() for t in runs]
    unsolved = [t for t in tasks if t.task_id not in kept]
    cap = len(unsolved) if cfg.rft_teacher_mix is None else int(
        round(cfg.rft_teacher_mix * len(student)))
    teacher = [r for r in (teacher_run(t, index, seed) for t in unsolved[:cap]) if r is not None]
    counts.update(tasks=len(tasks), episodes=len(trajs), solved_tasks=len(kept),
                  student_examples=len(student), teacher_examples=len(teacher),
                  unsolved_tasks=len(unsolved))
    return student + teacher, counts


def sft_config(cfg):
    """The sft trainer's settings for a round's fine-tune (``sft.Config``: its data path and loss,
    rl's learning rate, batch and precision)."""
    from coaflow.stages import sft

    return sft.Config(model="(rl policy)", chat_template="model", max_length=cfg.rft_max_length,
                      epochs=float(cfg.rft_epochs), max_steps=-1, lr=cfg.rft_lr,
                      lr_scheduler="constant", warmup_ratio=0.0, batch_size=cfg.rft_batch_size,
                      grad_accum=1, length_grouped=True, bf16=cfg.bf16,
                      gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1,
                      save_steps=10**6, holdout=0, decisive_weight=1.0)


def fine_tune(cfg, policy: Path, data: list, out: Path, seed: int, callbacks: tuple = ()
              ) -> tuple[Path, dict]:
    """One round's update: ``data`` (trajectories) as sft examples, the sft trainer from
    ``policy``; ``(model folder, numbers)``."""
    from coaflow.models.prompt import to_example
    from coaflow.stages.rl_rollout import load_policy
    from coaflow.stages.sft_trainer import build_trainer, save_final

    model, tok, template = load_policy(policy)
    if template is not None:  # the training variant (generation markers) renders the same text
        tok.chat_template = template
    examples = [to_example(t) for t in data]
    lengths = [len(tok.apply_chat_template(e["messages"], tools=e["tools"], tokenize=True,
                                           return_dict=True)["input_ids"]) for e in examples]
    keep = [e for e, n in zip(examples, lengths, strict=True) if n <= cfg.rft_max_length]
    if not keep:
        raise PipelineError(f"rl: every example of the round is longer than rl.rft_max_length="
                            f"{cfg.rft_max_length} tokens; raise it")
    trainer, history = build_trainer(sft_config(cfg), model, tok, keep, out / "checkpoints", seed,
                                     callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    final = save_final(trainer, out / "model")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = max((h.get("num_tokens", 0) for h in history), default=0)
    return final, {"update_seconds": seconds, "examples": len(keep),
                   "examples_too_long": len(examples) - len(keep),
                   "loss_first": losses[0] if losses else float("nan"),
                   "loss_last": losses[-1] if losses else float("nan"),
                   "train_tokens": float(tokens), "steps": trainer.state.global_step}


def sample(cfg, policy: Path, tasks: list, budgets: dict, seed: int) -> tuple[list, dict]:
    """``rl.rft_samples`` episodes of every task from ``policy``; ``(trajectories, numbers)``."""
    from coaflow.agent import TransformersBackend, run_episodes
    from coaflow.models.loading import inference_dtype

    backend = TransformersBackend(str(policy), batch_size=len(tasks) * cfg.rft_samples,
                                  dtype=inference_dtype(cfg.rollout_dtype),
                                  threads=cfg.rollout_threads or None, field="rl: the policy")
    start = time.perf_counter()
    trajs = run_episodes(backend, tasks, budgets=budgets, temperature=cfg.temperature,
                         seed=seed, samples=cfg.rft_samples)
    seconds = time.perf_counter() - start
    s = backend.stats
    return trajs, {"rollout_seconds": seconds,
                   "rollout_tokens_per_s": s["generated_tokens"] / seconds if seconds else 0.0,
                   "rollout_entropy": s["entropy_sum"] / s["sampled_tokens"]
                   if s["sampled_tokens"] else float("nan")}


def describe(trajs: list) -> dict:
    """Per episode means of a round's samples (success, turns, tool calls, malformed calls), and
    per suite success."""
    from coaflow.envs import rewards
    from coaflow.stages.rl_rollout import assistant_text, from_trajectory

    n = max(len(trajs), 1)
    out = {"success": sum(bool(t.outcome.correct) for t in trajs) / n,
           "turns": sum(t.details["turns"] for t in trajs) / n,
           "tool_calls": sum(t.details["tool_calls"] for t in trajs) / n,
           "format": sum(rewards.format_reward(assistant_text(from_trajectory(t)[0]))
                         for t in trajs) / n}
    for suite in sorted({t.task.suite for t in trajs}):
        mine = [t for t in trajs if t.task.suite == suite]
        out[f"success_{suite}"] = sum(bool(t.outcome.correct) for t in mine) / len(mine)
    return out


def train(cfg, ctx, sft_model: Path, tasks: list, budgets: dict, callbacks: tuple = (),
          on_round=None) -> tuple[Path, list[dict]]:
    """Every round (resuming after the last whole one); ``(final policy, history)``.
    ``on_round(row, model_dir)`` is called after each round (the study saves its curve there)."""
    gate = ctx.optional("gate")
    index = teacher_index(gate.outputs.get("accepted") if gate else None)
    root = ctx.out / ROUNDS
    history: list[dict] = []
    policy = sft_model
    start = time.perf_counter()
    per_round = min(cfg.rft_tasks, len(tasks))
    last_round = 0.0
    for r in range(1, cfg.rft_rounds + 1):
        folder = root / str(r)
        if ctx.resume and (folder / "done").is_file() and (folder / "model").is_dir():
            row = json.loads((folder / "done").read_text())
            history.append(row)
            policy = folder / "model"
            continue
        shutil.rmtree(folder, ignore_errors=True)
        spent = (time.perf_counter() - start) / 60
        if cfg.max_minutes is not None and spent + last_round > cfg.max_minutes:
            break  # the next round would end past the budget (judged by the last one's length)
        began = time.perf_counter()
        first = (r - 1) * per_round
        picked = [tasks[(first + i) % len(tasks)] for i in range(per_round)]
        seed = ctx.run.seed * 100_003 + r
        trajs, rolled = sample(cfg, policy, picked, budgets, seed)
        data, counts = round_data(picked, trajs, cfg, index, seed)
        row = {"round": r, **describe(trajs), **rolled, **counts}
        folder.mkdir(parents=True, exist_ok=True)
        write_samples(folder / "samples.txt", trajs, data)
        if not data:
            row.update(update_seconds=0.0, examples=0)
        else:
            policy, tuned = fine_tune(cfg, policy, data, folder, ctx.run.seed + r, callbacks)
            row.update(tuned)
        row["minutes"] = (time.perf_counter() - start) / 60
        last_round = (time.perf_counter() - began) / 60
        row["model"] = str(policy)
        (folder / "done").write_text(json.dumps(row))
        history.append(row)
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"rl/{k}": float(v) for k, v in row.items()
                                     if isinstance(v, (int, float)) and k != "round"}, step=r)
        print(f"[rl] rft round {r}: success {row['success']:.2f}, kept {counts['student_examples']}"
              f" student + {counts['teacher_examples']} teacher runs, {row['minutes']:.1f} min",
              flush=True)
        if on_round is not None:
            on_round(row, policy)
    return policy, history


def drop_round_models(out: Path) -> None:
    """Free the rounds' model folders once the stage's own output holds what goes on; the
    rounds' records (``done``, ``samples.txt``) stay."""
    for folder in (out / ROUNDS).glob("*/model"):
        shutil.rmtree(folder, ignore_errors=True)


def write_samples(path: Path, trajs: list, data: list, per_task: int = 1) -> None:
    """A readable record of the round: one episode per task and what was trained on."""
    from coaflow.agent import category
    from coaflow.stages.rl_rollout import from_trajectory, transcript

    chosen = {t.id for t in data}
    seen: set[str] = set()
    lines = []
    for t in trajs + [t for t in data if t.id not in {x.id for x in trajs}]:
        if t.task.task_id in seen and t.id not in chosen:
            continue
        seen.add(t.task.task_id)
        lines.append(f"=== {t.id} gold={t.task.answer!r} -> {category(t)}"
                     f"{' [trained on]' if t.id in chosen else ''}\n"
                     f"{transcript(from_trajectory(t)[0], 600)}\n")
    path.write_text("\n".join(lines[:per_task * 64]))
