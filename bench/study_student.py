"""The student study: train SFT with a config, judge snapshots by whole episodes, print the curve.

One row of the issue's table per call: the sft stage runs in process on a gate folder with the
given overrides, a callback saves the model at the given optimizer steps (``--steps``; or at
training minutes, ``--marks``), and every snapshot (and the final model) plays the test split of
each suite through the one agent loop (``stages.evaluate``, Wilson 95 % intervals) within the
budget sft derived from the teacher runs it trains on (``agent.budget``, the run's
``budget.json``), as the pipeline's evaluate does. Intermediate snapshots sit mid-schedule (the
learning rate has not decayed yet), so they draw a lower bound of what a run that short would
reach. Each row records the tokens trained on, so a curve read on another machine converts to its
minutes at that machine's tokens/s (``bench/bench_sft_speed.py``).

    python bench/study_student.py --gate /tmp/w/runs/r/gate --label base --steps 16,32,48 \
        --set sft.max_steps=64

Appends one JSON line per model to ``--results`` (default bench/results/student_study.jsonl)
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path


def snapshot_callback(marks_min: list[float], marks_steps: list[int], out: Path, saved: list,
                      tokens: list):
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        """Save the model at each mark (minutes of training, or optimizer steps)."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.todo = time.time(), sorted(marks_min)
            self.steps = sorted(marks_steps)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                tokens.append(int(float(logs["num_tokens"])))

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kw):
            minutes = (time.time() - self.t0) / 60
            due = []
            while self.todo and minutes >= self.todo[0]:
                due.append(f"{self.todo.pop(0):g}min")
            while self.steps and state.global_step >= self.steps[0]:
                due.append(f"step{self.steps.pop(0)}")
            for mark in due[:1]:
                folder = out / f"snap-{mark}"
                model.save_pretrained(folder)
                processing_class.save_pretrained(folder)
                saved.append({"minutes": round(minutes, 2), "step": state.global_step,
                              "tokens": tokens[-1] if tokens else None, "model": str(folder)})

    return Snapshots()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gate", required=True, help="a completed gate stage folder")
    ap.add_argument("--label", required=True, help="this configuration's name in the table")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override, e.g. sft.epochs=4 (repeatable)")
    ap.add_argument("--marks", default="", help="training minutes to snapshot at, e.g. 5,10")
    ap.add_argument("--steps", default="", help="optimizer steps to snapshot at, e.g. 16,32")
    ap.add_argument("--profile", default="default", help="the profile the overrides apply to")
    ap.add_argument("--n", type=int, default=60, help="test tasks per suite")
    ap.add_argument("--reuse", action="store_true",
                    help="the label's sft run is done (its result.json and snap-* folders are in "
                         "--out): evaluate them again without training (--steps: which "
                         "snapshots, in that order; the final model last)")
    ap.add_argument("--out", default="/tmp/student_study", help="work folder")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results" /
                                              "student_study.jsonl"))
    args = ap.parse_args(argv)

    from coaflow.config import load_config
    from coaflow.contract import load_stage
    from coaflow.runner import execute
    from coaflow.stages import evaluate as E

    cfg = load_config(args.profile, ["tracking.enabled=false", *args.overrides])
    out = Path(args.out) / args.label
    saved: list[dict] = []
    tokens: list[int] = []
    sft_module = load_stage("sft")
    wrapped = types.ModuleType(sft_module.__name__)
    wrapped.__dict__.update(sft_module.__dict__)
    callbacks = (snapshot_callback([float(m) for m in args.marks.split(",") if m],
                                   [int(m) for m in args.steps.split(",") if m], out, saved,
                                   tokens),)
    wrapped.run = lambda section, ctx: sft_module.train(section, ctx, callbacks=callbacks)
    done = out / "sft" / "result.json"
    if args.reuse:
        if not done.exists():
            raise SystemExit(f"--reuse: {done} does not exist (train the label first)")
        from coaflow.contract import Result

        result = Result.from_json(json.loads(done.read_text()), base=done.parent)
        sft_minutes = result.metrics["train_seconds"] / 60
        saved = [{"minutes": None, "step": int(f.name.removeprefix("snap-step")), "tokens": None,
                  "model": str(f)} for f in sorted(out.glob("snap-step*"),
                                                   key=lambda f: int(f.name[9:]))]
        if args.steps:  # only these snapshots (the final model is always evaluated)
            saved = [m for m in saved if str(m["step"]) in args.steps.split(",")]
    else:
        t0 = time.time()
        result = execute("sft", cfg, out / "sft", {"gate": args.gate}, module=wrapped,
                         use_cache=False)
        sft_minutes = (time.time() - t0) / 60
    models = [*saved, {"minutes": round(result.metrics["train_seconds"] / 60, 2),
                       "step": int(result.metrics["global_step"]),
                       "tokens": int(result.metrics["train_tokens"]),
                       "model": str(result.path("model")), "final": True}]
    if args.reuse:  # the snapshots in the order --steps names them; the final model last
        order = args.steps.split(",") if args.steps else []
        models = sorted(models[:-1], key=lambda m: order.index(str(m["step"]))
                        if str(m["step"]) in order else len(order)) + models[-1:]

    from coaflow.agent.budget import read_record

    ev = cfg.evaluate.model_copy(update={"suites": {s: args.n for s in cfg.evaluate.suites}})
    budgets, fit = E.budgets_for(ev, read_record(result.outputs.get("budget")))
    tasks = E.load_test_tasks(ev.suites, cfg.run.seed)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    for m in models:
        name = f"{args.label}@step{m['step']}"
        _, summary = E.evaluate({name: m["model"]}, tasks, ev, out / f"eval-step{m['step']}",
                                seed=cfg.run.seed, budgets=budgets, fit=fit)
        row = {"label": args.label, "overrides": args.overrides, **m,
               "sft_wall_minutes": round(sft_minutes, 2),
               "sft_metrics": {k: result.metrics.get(k) for k in (
                   "examples", "examples_truncated", "train_loss_final", "tokens_per_second",
                   "decisive_token_accuracy", "heldout_episode_success")},
               "budget": {s: [b.max_turns, b.max_new_tokens] for s, b in budgets.items()},
               "eval_seconds": summary["seconds"][name],
               "table": summary["table"][name], "slices": summary["slices"][name],
               "categories": {s: d["categories"] for s, d in summary["details"][name].items()},
               "cut_turns": {s: d["cut_turns"] for s, d in summary["details"][name].items()},
               "mean_turns": {s: d["mean_turns"] for s, d in summary["details"][name].items()}}
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        cells = "  ".join(f"{s} {c['success']:.1%} [{c['lo']:.1%}, {c['hi']:.1%}]"
                          for s, c in row["table"].items())
        print(f"{name:40s} step {m['step']:5d}  {cells}", flush=True)


if __name__ == "__main__":
    main()
