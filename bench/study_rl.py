"""RL study on the pretrained student: is there signal, and does rl gain on the test split?

    # signal: per-task pass rate over K sampled episodes (the tasks neither always nor never
    # solved are GRPO's usable set, and RFT's source of kept successes), by hop, the sampling
    # entropy, the share of GRPO groups dynamic sampling would drop, rollout tokens/s; --budget
    # derived: each suite's budget from the sft stage's budget.json (the run's fair budget), or
    # TURNSxTOKENS for all suites (4x128: rl's budget before agent.budget)
    python bench/study_rl.py signal --model RUN/sft/model --split train --n 12,8 --k 8 \
        --temperature 1.0 --budget derived --json bench/results/rl_signal.jsonl

    # train: rl from MODEL for --minutes of wall time (the stage's own train(), the default
    # profile's rl section plus --set; rl.select off: the study judges on test itself), the
    # policy saved at each --marks minute (grpo) or after every round (rft)
    python bench/study_rl.py train --model RUN/sft/model --gate RUN/gate/accepted \
        --minutes 15 --marks 5,10 --out /tmp/rl_grpo --set rl.algorithm=grpo

    # eval: the sft model and every saved policy on the same test tasks (and --validation
    # tasks), greedy, the fair budget (evaluate's own functions, its row cache), each paired
    # against the sft model: Wilson intervals, paired bootstrap 95 % CI, McNemar p, turns and
    # tool calls by hop, format errors
    python bench/study_rl.py eval --model RUN/sft/model --policies /tmp/rl_grpo/saved.json \
        --policies /tmp/rl_rft/saved.json --eval-n 60 --json bench/results/rl_study.jsonl

Every episode runs through the one agent loop (``coaflow.agent.run_episodes``) with the
transformers backend (bf16 where the CPU has native kernels, KV cache kept across turns, the
whole group batched), exactly as rl's rollouts and evaluate run them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path


def dropped_share(p: float, g: int) -> float:
    """Probability that a group of ``g`` episodes of a task with pass rate ``p`` is all equal."""
    return p ** g + (1 - p) ** g


def signal(model: str, tasks: list, k: int, temperature: float, budgets: dict,
           seed: int = 0, batch_size: int = 32, threads: int | None = None,
           backend=None, chunk: int = 32) -> dict:
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

    # a few tasks at a time: the backend keeps every live episode's KV cache (fp32 on a CPU
    # without bf16 kernels: ~46 kB a token for this student), so 160 long episodes at once
    # would not fit beside other jobs
    per = max(1, chunk // k)
    trajs = []
    for i in range(0, len(tasks), per):
        trajs += run_episodes(backend, tasks[i:i + per], budgets=budgets,
                              temperature=temperature, seed=seed + i, samples=k,
                              progress=progress)
    seconds = time.perf_counter() - start
    from coaflow.agent import category
    from coaflow.stages.rl_rft import follows_hops

    per_task: dict[str, list] = defaultdict(list)
    fmt, turns, calls = [], [], []
    level = {t.task_id: t.difficulty for t in tasks}
    episodes_by: dict[tuple, list] = defaultdict(list)
    for t in trajs:
        episodes_by[t.task.suite, t.task.difficulty].append(t)
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
               for g in (4, 8)},
            # by difficulty (kbqa: hops): pass rate, tasks solved sometimes, and how the
            # episodes went (a success that skipped the hops is a shortcut)
            "by_level": {str(d): {
                "tasks": sum(1 for tid in rates if suite_of[tid] == suite and level[tid] == d),
                "pass_rate": round(sum(v for tid, v in rates.items() if suite_of[tid] == suite
                                       and level[tid] == d)
                                   / max(1, sum(1 for tid in rates if suite_of[tid] == suite
                                                and level[tid] == d)), 3),
                "mixed": sum(1 for tid, v in rates.items() if suite_of[tid] == suite
                             and level[tid] == d and 0 < v < 1),
                "solved": sum(1 for tid, v in rates.items() if suite_of[tid] == suite
                              and level[tid] == d and v > 0),
                "turns": round(sum(e.details["turns"] for e in eps) / len(eps), 2),
                "tool_calls": round(sum(e.details["tool_calls"] for e in eps) / len(eps), 2),
                "shortcut_successes": sum(bool(e.outcome.correct) and not follows_hops(e)
                                          for e in eps),
                "successes": sum(bool(e.outcome.correct) for e in eps),
                "stops": dict(sorted(Counter(category(e) for e in eps).items()))}
                for (su, d), eps in sorted(episodes_by.items()) if su == suite}}
    out["rates"] = rates
    out["_trajs"] = trajs
    return out


def cmd_signal(a) -> dict:
    from coaflow import envs

    sizes = dict(zip(a.suites.split(","), map(int, str(a.n).split(",")), strict=False))
    tasks = [t for s, n in sizes.items() for t in envs.make_tasks(s, a.split, n, seed=a.seed)]
    budgets = study_budgets(a.model, a.budget, sizes)
    load = os.getloadavg()[0]
    res = signal(str(a.model), tasks, a.k, a.temperature, budgets, seed=a.seed,
                 threads=a.threads, chunk=a.chunk, batch_size=a.chunk)
    trajs = res.pop("_trajs")
    if a.transcripts:
        write_transcripts(a.transcripts, trajs, per_task=2)
    return {"what": "signal", "model": str(a.model), "split": a.split,
            "budget": {s: str(b) for s, b in budgets.items()}, "threads": a.threads,
            "load_before": load, "load": os.getloadavg()[0], **res}


def study_budgets(model: Path, spec: str, suites) -> dict:
    """``{suite: Budget}``: ``derived`` from the sft stage's budget.json beside ``model`` (the
    fair budget the run's rl and evaluate use), or ``TURNSxTOKENS`` for every suite."""
    from coaflow.agent import budget

    if spec == "derived":
        record = Path(model).resolve().parent / budget.RECORD
        if not record.is_file():
            raise SystemExit(f"--budget derived: no {record} (the sft stage writes it)")
        budgets, _ = budget.resolve(sorted(suites), budget.read_record(record))
        return budgets
    turns, tokens = (int(x) for x in spec.lower().split("x"))
    return {s: budget.Budget(turns, tokens) for s in suites}


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
    import shutil

    import torch
    from transformers import TrainerCallback

    from coaflow.config import load_config
    from coaflow.contract import Context, Result
    from coaflow.stages import rl
    from coaflow.tracking import Tracker

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    marks = sorted(float(m) for m in a.marks.split(",") if m) if a.marks else []
    cfg = load_config(a.profile, ["tracking.enabled=false", f"run.workdir={out}",
                                  f"rl.max_steps={a.max_steps}", f"rl.save_steps={a.max_steps}",
                                  f"rl.max_minutes={a.minutes}", "rl.select=false",
                                  *a.overrides])
    saved: dict[str, dict] = {}
    start = time.perf_counter()

    def keep(name: str, model_dir, row: dict | None = None) -> None:
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(model_dir, d)
        saved[str(d)] = {"minutes": round((time.perf_counter() - start) / 60, 2),
                         **({k: v for k, v in row.items() if k != "model"} if row else {})}

    class Marks(TrainerCallback):
        """grpo: save the policy at each mark (minutes of training)."""

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
            minutes = (time.perf_counter() - self.start) / 60
            while marks and minutes >= marks[0]:
                d = out / f"grpo_{marks.pop(0):g}min"
                model.save_pretrained(d)
                processing_class.save_pretrained(d)
                saved[str(d)] = {"minutes": round(minutes, 2), "step": state.global_step}

    def on_round(row: dict, model_dir) -> None:
        keep(f"rft_round{row['round']}", model_dir, row)

    stage = out / "rl"
    stage.mkdir(exist_ok=True)
    sft_dir = Path(a.model).resolve()
    record = sft_dir.parent / "budget.json"
    inputs = {"sft": Result(outputs={"model": str(sft_dir),
                                     **({"budget": str(record)} if record.is_file() else {})})}
    if a.gate:
        inputs["gate"] = Result(outputs={"accepted": str(Path(a.gate).resolve())})
    ctx = Context(run_id="study", out=stage, run=cfg.run, tracker=Tracker(out, enabled=False),
                  inputs=inputs)
    load = os.getloadavg()[0]
    res = rl.train(cfg.rl, ctx, callbacks=(Marks(),) if cfg.rl.algorithm == "grpo" else (),
                   on_round=on_round)
    minutes = (time.perf_counter() - start) / 60
    if cfg.rl.algorithm == "grpo":
        saved[str(Path(res.outputs["model"]))] = {"minutes": round(minutes, 2),
                                                   "step": res.metrics.get("global_step")}
    (out / "saved.json").write_text(json.dumps(
        {"algorithm": cfg.rl.algorithm, "saved": saved}, indent=1))
    hist = [json.loads(x) for x in (stage / "history.jsonl").read_text().splitlines()]
    keys = ("step", "round", "reward", "success", "success_kbqa", "success_calc",
            "groups_dropped", "malformed", "malformed_skipped", "entropy", "rollout_entropy",
            "step_seconds", "generate_seconds", "score_seconds", "update_seconds",
            "rollout_seconds", "model_tokens", "turns", "tool_calls", "format",
            "curriculum_mixed", "curriculum_seen", "solved_tasks", "successes", "distinct",
            "shortcuts", "malformed", "student_examples", "teacher_examples", "train_tokens",
            "loss_first", "loss_last", "minutes", "rollout_tokens_per_s")
    return {"what": "train", "algorithm": cfg.rl.algorithm, "model": str(a.model),
            "profile": a.profile, "overrides": a.overrides, "rl_minutes": round(minutes, 2),
            "threads": a.threads, "load_before": load, "load_after_rl": os.getloadavg()[0],
            "metrics": res.metrics, "summary": {k: v for k, v in res.summary.items()
                                                if k in ("budget", "decision")},
            "history": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in h.items()
                         if k in keys} for h in hist],
            "saved": saved}


def cmd_eval(a) -> dict:
    from coaflow.config import load_config

    cfg = load_config(a.profile, ["tracking.enabled=false", *a.overrides])
    specs: dict[str, str] = {"sft": str(Path(a.model).resolve())}
    minutes: dict[str, dict] = {}
    for f in a.policies:
        rec = json.loads(Path(f).read_text())
        for path, info in rec["saved"].items():
            name = (f"{rec['algorithm']}@{info['minutes']:g}min"
                    + (f" r{info['round']}" if "round" in info else ""))
            specs[name], minutes[name] = path, info
    for extra in a.extra:
        name, _, path = extra.partition("=")
        specs[name] = path
    res = {"what": "eval", "load_before": os.getloadavg()[0], "threads": a.threads,
           "test": paired_eval(specs, a.eval_n, cfg, Path(a.out) / "test", "test", a.threads),
           "minutes": minutes}
    if a.validation_n:
        res["validation"] = paired_eval(specs, a.validation_n, cfg, Path(a.out) / "validation",
                                        "validation", a.threads)
    res["load_after"] = os.getloadavg()[0]
    return res


def paired_eval(specs: dict[str, str], n: int, cfg, out: Path, split: str,
                threads: int = 1) -> dict:
    """Every model of ``specs`` on the same ``n`` tasks per suite of ``split``, greedy, within
    the sft model's fair budget (evaluate's own ``run_model``, row cache and summary); each
    paired against the ``sft`` row. Per model and suite: success [Wilson], format errors, turns
    and tool calls per episode by hop, how episodes ended. One suite at a time: the backend
    keeps every live episode's KV cache (fp32 here), and 120 long episodes at once did not fit
    beside the other jobs of a shared box."""
    from coaflow.agent.budget import read_record
    from coaflow.envs import make_tasks
    from coaflow.schema import write_jsonl
    from coaflow.stages import evaluate as E

    ev = cfg.evaluate.model_copy(update={"suites": {s: n for s in ("kbqa", "calc")},
                                         "threads": threads})
    budgets, fit = E.budgets_for(ev, read_record(Path(specs["sft"]).parent / "budget.json"))
    cache = Path(cfg.run.workdir).resolve() / "cache" / "evaluate"
    (out / "transcripts").mkdir(parents=True, exist_ok=True)
    print(f"evaluating {list(specs)} on {n} + {n} {split} tasks", flush=True)
    start = time.perf_counter()
    rows, seconds, cached = [], {}, []
    for name, spec in specs.items():
        t0 = time.perf_counter()
        trajs = []
        for suite in ev.suites:
            tasks = make_tasks(suite, split, n, seed=cfg.run.seed)
            got, hit = E.run_model(spec, tasks, ev, budgets=budgets, registry_uri=None,
                                   seed=cfg.run.seed, cache=cache, field=f"{name} {suite}")
            trajs += got
            if hit:
                cached.append(f"{name}/{suite}")
        seconds[name] = round(time.perf_counter() - t0, 1)
        write_jsonl(out / "transcripts" / f"{name.replace('/', '_')}.jsonl", trajs)
        rows += [E.outcome_row(name, t) for t in trajs]
        print(f"  {name}: {seconds[name]} s", flush=True)
    summary = E.summarize(rows, ev, cfg.run.seed, {})
    summary.update(budget=fit)
    (out / "table.md").write_text(E.markdown(summary))
    res = {"n": n, "split": split, "seconds": round(time.perf_counter() - start, 1),
           "row_seconds": seconds, "cached_rows": cached,
           "budget": {s: str(b) for s, b in budgets.items()}, "models": {}, "paired_vs_sft": {}}
    for name, spec in specs.items():
        mine = [r for r in rows if r["model"] == name]
        res["models"][name] = {
            "spec": spec, **summary["table"][name],
            "details": {s: {k: v for k, v in d.items()
                            if k in ("format_error_rate", "mean_turns", "mean_tool_calls",
                                     "categories", "mean_tokens")}
                        for s, d in summary["details"][name].items()},
            "by_hop": by_hop(mine)}
        if name != "sft":
            res["paired_vs_sft"][name] = E.compare(mine, [r for r in rows if r["model"] == "sft"],
                                                   ev.bootstrap, cfg.run.seed)
    print(E.markdown(summary))
    return res


def by_hop(rows: list[dict]) -> dict:
    """Per suite and difficulty (kbqa: hops): success, turns and tool calls per episode."""
    out: dict = {}
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[r["suite"], r["difficulty"]].append(r)
    for (suite, d), rs in sorted(groups.items()):
        out.setdefault(suite, {})[str(d)] = {
            "n": len(rs), "success": sum(r["success"] for r in rs),
            "turns": round(sum(r["turns"] for r in rs) / len(rs), 2),
            "tool_calls": round(sum(r["tool_calls"] for r in rs) / len(rs), 2),
            "format_errors": sum(r["format_errors"] > 0 for r in rs)}
    return out


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
    s.add_argument("--budget", default="derived", help="derived (the sft stage's budget.json "
                   "beside --model) or TURNSxTOKENS for every suite, e.g. 4x128")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--chunk", type=int, default=32, help="episodes run (and cached) at once")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--transcripts", help="write a few episodes here as text")
    s.add_argument("--json", help="append the result as one JSON line to this file")
    t = sub.add_parser("train")
    t.add_argument("--model", required=True, type=Path, help="the sft model folder")
    t.add_argument("--gate", help="the gate's accepted runs (rft's teacher runs)")
    t.add_argument("--profile", default="default")
    t.add_argument("--minutes", type=float, default=15.0, help="rl wall-time budget")
    t.add_argument("--marks", default="", help="grpo: minutes at which to save the policy, "
                   "e.g. 5,10")
    t.add_argument("--max-steps", type=int, default=1000)
    t.add_argument("--threads", type=int, default=None, help="torch threads of the update")
    t.add_argument("--out", default="/tmp/rl_study")
    t.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--json", help="append the result as one JSON line to this file")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True, type=Path, help="the sft model folder")
    e.add_argument("--policies", action="append", default=[], help="a train run's saved.json")
    e.add_argument("--extra", action="append", default=[], help="NAME=FOLDER, another row")
    e.add_argument("--profile", default="default")
    e.add_argument("--eval-n", type=int, default=60, help="test tasks per suite")
    e.add_argument("--validation-n", type=int, default=0, help="validation tasks per suite")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", default="/tmp/rl_eval")
    e.add_argument("--set", dest="overrides", action="append", default=[])
    e.add_argument("--json", help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    res = {"signal": cmd_signal, "train": cmd_train, "eval": cmd_eval}[a.cmd](a)
    line = json.dumps(res)
    print(json.dumps({k: v for k, v in res.items() if k != "rates"}, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
