"""RL study on the pretrained student: is there signal, and does RL gain on the test split?

    # signal: per-task pass rate over K sampled episodes (the tasks neither always nor never
    # solved are RL's usable set), the sampling entropy, the share of GRPO groups dynamic
    # sampling would drop, rollout tokens/s
    python bench/study_rl.py signal --model /tmp/ckpts/checkpoint-32 --split train --n 24 \\
        --k 8 --temperature 1.0 --json bench/results/rl_signal.jsonl

    # train: rl from MODEL for --minutes of wall time (the stage's own train(), the default
    # profile's rl section plus --set), the policy saved at each --marks minute, then every saved
    # policy and the sft model on the same test tasks, greedy (evaluate's own functions), and
    # each paired against the sft model: Wilson intervals, paired bootstrap 95 % CI, McNemar p
    python bench/study_rl.py train --model /tmp/ckpts/checkpoint-32 --minutes 15 \
        --marks 5,10 --eval-n 60 --out /tmp/rl_study --json bench/results/rl_study.jsonl

Every episode runs through the one agent loop (``coaflow.agent.run_episodes``) with the
transformers backend (bf16 where the CPU has native kernels, KV cache kept across turns, the
whole group batched), exactly as rl's rollouts and evaluate run them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path


def dropped_share(p: float, g: int) -> float:
    """Probability that a group of ``g`` episodes of a task with pass rate ``p`` is all equal."""
    return p ** g + (1 - p) ** g


def signal(model: str, tasks: list, k: int, temperature: float, max_turns: int,
           max_new_tokens: int, seed: int = 0, batch_size: int = 64, threads: int | None = None,
           backend=None) -> dict:
    """Pass rate per task over ``k`` sampled episodes, and the numbers RL's signal hangs on."""
    from coaflow.agent import TransformersBackend, run_episodes
    from coaflow.envs import rewards
    from coaflow.models.loading import inference_dtype
    from coaflow.stages.rl_rollout import from_trajectory

    if backend is None:
        backend = TransformersBackend(model, batch_size=batch_size, dtype=inference_dtype("auto"),
                                      threads=threads)
    for key in backend.stats:
        backend.stats[key] = type(backend.stats[key])(0)
    start = time.perf_counter()
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        print(f"  {done[0]}/{len(tasks) * k} episodes, {time.perf_counter() - start:.0f} s",
              flush=True)

    trajs = run_episodes(backend, tasks, max_turns=max_turns, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed, samples=k, progress=progress)
    seconds = time.perf_counter() - start
    per_task: dict[str, list] = defaultdict(list)
    fmt, turns, calls = [], [], []
    for t in trajs:
        per_task[t.task.task_id].append(float(bool(t.outcome.correct)))
        msgs = from_trajectory(t)[0]
        from coaflow.stages.rl_rollout import assistant_text

        fmt.append(rewards.format_reward(assistant_text(msgs)))
        turns.append(t.details["turns"])
        calls.append(t.details["tool_calls"])
    suite_of = {t.task_id: t.suite for t in tasks}
    rates = {tid: sum(v) / len(v) for tid, v in per_task.items()}
    out = {"tasks": len(rates), "k": k, "temperature": temperature, "seconds": round(seconds, 1),
           "episodes_per_s": round(len(trajs) / seconds, 3),
           "generated_tokens_per_s": round(backend.stats["generated_tokens"] / seconds, 1),
           "entropy": round(backend.stats["entropy_sum"] / max(backend.stats["sampled_tokens"], 1),
                            3),
           "format_ok": round(sum(fmt) / len(fmt), 3), "turns": round(sum(turns) / len(turns), 2),
           "tool_calls": round(sum(calls) / len(calls), 2), "by_suite": {}}
    for suite in sorted(set(suite_of.values())):
        r = [v for tid, v in rates.items() if suite_of[tid] == suite]
        out["by_suite"][suite] = {
            "tasks": len(r), "success": round(sum(r) / len(r), 3),
            "mixed": sum(0 < v < 1 for v in r), "never": sum(v == 0 for v in r),
            "always": sum(v == 1 for v in r),
            **{f"dropped_g{g}": round(sum(dropped_share(v, g) for v in r) / len(r), 3)
               for g in (4, 8)}}
    out["rates"] = rates
    out["_trajs"] = trajs
    return out


def cmd_signal(a) -> dict:
    from coaflow import envs

    sizes = dict(zip(a.suites.split(","), map(int, str(a.n).split(",")), strict=False))
    tasks = [t for s, n in sizes.items() for t in envs.make_tasks(s, a.split, n, seed=a.seed)]
    res = signal(str(a.model), tasks, a.k, a.temperature, a.max_turns, a.max_new_tokens,
                 seed=a.seed, threads=a.threads)
    trajs = res.pop("_trajs")
    if a.transcripts:
        write_transcripts(a.transcripts, trajs, per_task=2)
    return {"what": "signal", "model": str(a.model), "split": a.split, "max_turns": a.max_turns,
            "max_new_tokens": a.max_new_tokens, "load": os.getloadavg()[0], **res}


def write_transcripts(path: str, trajs: list, per_task: int = 1, tasks: int = 8) -> None:
    """A few episodes as readable text: the first ``per_task`` of the first ``tasks`` tasks."""
    from coaflow.agent import category
    from coaflow.stages.rl_rollout import from_trajectory, transcript

    seen: dict[str, int] = defaultdict(int)
    lines = []
    for t in trajs:
        tid = t.task.task_id
        if seen[tid] >= per_task or (tid not in seen and len(seen) >= tasks):
            continue
        seen[tid] += 1
        lines.append(f"=== {tid} gold={t.task.answer!r} -> {category(t)} "
                     f"(turns {t.details['turns']}, calls {t.details['tool_calls']}, "
                     f"stop {t.details['stop']})\n{transcript(from_trajectory(t)[0], 600)}\n")
    Path(path).write_text("\n".join(lines))


def cmd_train(a) -> dict:
    from transformers import TrainerCallback

    from coaflow.config import load_config
    from coaflow.contract import Context, Result
    from coaflow.stages import rl
    from coaflow.tracking import Tracker

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    marks = sorted(float(m) for m in a.marks.split(",") if m) if a.marks else []
    step_marks = {int(m) for m in a.step_marks.split(",") if m} if a.step_marks else set()
    cfg = load_config(a.profile, ["tracking.enabled=false", f"run.workdir={out}",
                                  f"rl.max_steps={a.max_steps}", f"rl.save_steps={a.max_steps}",
                                  *a.overrides])
    saved: dict[str, float] = {}

    class Budget(TrainerCallback):
        """Save the policy at each mark; stop at ``--minutes`` (checked after every step)."""

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
            minutes = (time.perf_counter() - self.start) / 60
            due = []
            while marks and minutes >= marks[0]:
                due.append(f"rl_{marks.pop(0):g}min")
            if state.global_step in step_marks:
                due.append(f"rl_step{state.global_step}")
            for name in due:
                d = out / name
                model.save_pretrained(d)
                processing_class.save_pretrained(d)
                saved[str(d)] = round(minutes, 2)
            if minutes >= a.minutes:
                control.should_training_stop = True

    stage = out / "rl"
    stage.mkdir(exist_ok=True)
    ctx = Context(run_id="study", out=stage, run=cfg.run, tracker=Tracker(out, enabled=False),
                  inputs={"sft": Result(outputs={"model": str(Path(a.model).resolve())})})
    start = time.perf_counter()
    res = rl.train(cfg.rl, ctx, callbacks=(Budget(),))
    minutes = (time.perf_counter() - start) / 60
    saved[res.outputs["model"]] = round(minutes, 2)
    hist = [json.loads(x) for x in (stage / "history.jsonl").read_text().splitlines()]
    report = {"what": "train", "model": str(a.model), "profile": a.profile,
              "overrides": a.overrides, "rl_minutes": round(minutes, 2),
              "load_after_rl": os.getloadavg()[0], "metrics": res.metrics,
              "history": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in h.items()
                           if k in ("step", "reward", "success", "groups_dropped", "entropy",
                                    "step_seconds", "generate_seconds", "score_seconds",
                                    "update_seconds", "model_tokens", "turns", "tool_calls",
                                    "format", "curriculum_mixed", "curriculum_seen")}
                          for h in hist],
              "saved": saved}
    if a.eval_n:
        report["eval"] = paired_eval(a.model, saved, a.eval_n, cfg, out / "eval")
        report["load_after_eval"] = os.getloadavg()[0]
    return report


def paired_eval(base: str, candidates: dict[str, float], n: int, cfg, out: Path) -> dict:
    """The sft model and every candidate on the same ``n`` test tasks per suite (evaluate's
    settings: greedy, its max_turns / max_new_tokens); each candidate paired against the sft."""
    from coaflow.stages import evaluate as E

    ev = cfg.evaluate.model_copy(update={"suites": {s: n for s in ("kbqa", "calc")},
                                         "transcripts": 2})
    tasks = E.load_test_tasks(ev.suites, cfg.run.seed)
    specs = {"sft": str(base), **{f"rl@{m}min": p for p, m in candidates.items()}}
    print(f"evaluating {list(specs)} on {len(tasks)} test tasks", flush=True)
    start = time.perf_counter()
    rows, summary = E.evaluate(specs, tasks, ev, out, seed=cfg.run.seed)
    res = {"n": n, "seconds": round(time.perf_counter() - start, 1),
           "models": {name: {"spec": spec, **summary["table"][name],
                             "details": {s: {k: v for k, v in d.items()
                                             if k in ("format_error_rate", "mean_turns",
                                                      "mean_tool_calls", "categories",
                                                      "mean_tokens")}
                                         for s, d in summary["details"][name].items()}}
                      for name, spec in specs.items()},
           "paired_vs_sft": {}}
    sft_rows = [r for r in rows if r["model"] == "sft"]
    for name in specs:
        if name != "sft":
            res["paired_vs_sft"][name] = E.compare([r for r in rows if r["model"] == name],
                                                   sft_rows, ev.bootstrap, cfg.run.seed)
    print(E.markdown(summary))
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("signal")
    s.add_argument("--model", required=True, type=Path)
    s.add_argument("--split", default="train")
    s.add_argument("--suites", default="kbqa,calc")
    s.add_argument("--n", default="24", help="tasks per suite (one number, or one per suite: "
                   "12,4)")
    s.add_argument("--k", type=int, default=8, help="sampled episodes per task")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--max-turns", type=int, default=4)
    s.add_argument("--max-new-tokens", type=int, default=96)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--transcripts", help="write a few episodes here as text")
    s.add_argument("--json", help="append the result as one JSON line to this file")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True, type=Path, help="the sft model folder")
    t.add_argument("--profile", default="default")
    t.add_argument("--minutes", type=float, default=15.0, help="RL wall-time budget")
    t.add_argument("--marks", default="", help="minutes at which to save the policy, e.g. 5,10")
    t.add_argument("--step-marks", default="", help="steps after which to save the policy "
                   "too, e.g. 2 (the default profile's rl.max_steps)")
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--eval-n", type=int, default=60, help="test tasks per suite (0: no eval)")
    t.add_argument("--out", default="/tmp/rl_study")
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--json", help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    res = {"signal": cmd_signal, "train": cmd_train}[a.cmd](a)
    line = json.dumps(res)
    print(json.dumps({k: v for k, v in res.items() if k != "rates"}, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
