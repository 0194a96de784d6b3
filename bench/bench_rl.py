"""RL on the tiny profile: seconds per step, the share spent generating, episodes per second, and
(with ``--measure``) held-out success before and after RL, paired, with a 95 % interval.

    .venv/bin/python bench/bench_rl.py --model work/runs/RUN/sft/model            # 5 steps
    .venv/bin/python bench/bench_rl.py --model DIR --steps 20 --measure 50 \\
        --set rl.temperature=1.2 --set "rl.difficulty_mix={1: 1.0}"

Runs the stage's own ``train`` (the agent loop rolls out with the live policy, TRL trains) from an
SFT model folder into a temporary stage folder with tracking off, then reads the per-step history:
``generate_seconds`` (the rollout, agent loop and tools included) against ``step_seconds`` (the
whole optimizer step). ``--measure N`` runs N test-split tasks per suite greedily through the
agent loop with the SFT model and with the RL model (the same tasks) and reports success per
suite and the paired difference (mean of after-before per task, normal 95 % interval).
``rl.difficulty_mix`` picks the levels of the RL pool and of the measured tasks alike.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def paired(before: list[float], after: list[float]) -> dict:
    n = len(before)
    d = [a - b for a, b in zip(after, before, strict=True)]
    mean = sum(d) / n if n else float("nan")
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
    half = 1.96 * math.sqrt(var / n) if n > 1 else float("nan")
    return {"n": n, "before": sum(before) / n if n else float("nan"),
            "after": sum(after) / n if n else float("nan"), "diff": mean,
            "lo": mean - half, "hi": mean + half}


def success(model_dir: Path, tasks: list, budgets: dict) -> dict[str, list[float]]:
    """Greedy episodes within ``budgets`` (rl's): per task, success and evidence (a tool result
    held the answer)."""
    from coaflow.agent import TransformersBackend, run_episodes
    from coaflow.envs.rewards import evidence
    from coaflow.stages.rl_rollout import from_trajectory

    trajs = run_episodes(TransformersBackend(str(model_dir), batch_size=32), tasks,
                         budgets=budgets)
    return {"success": [float(bool(t.outcome.correct)) for t in trajs],
            "evidence": [evidence(t.task.suite, t.task.answer, from_trajectory(t)[0])
                         for t in trajs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="SFT model folder")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--measure", type=int, default=0, help="test tasks per suite (0: off)")
    ap.add_argument("--keep", type=Path, help="copy the RL model here")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from coaflow import envs
    from coaflow.config import load_config
    from coaflow.contract import Context, Result
    from coaflow.stages import rl
    from coaflow.tracking import Tracker

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_config("tiny", ["tracking.enabled=false", f"run.workdir={root}",
                                   f"rl.max_steps={a.steps}", f"rl.save_steps={a.steps}",
                                   "rl.algorithm=grpo", "rl.select=false", *a.overrides])
        mix = cfg.rl.difficulty_mix
        test = [t for s in cfg.rl.suites for t in
                envs.make_tasks(s, "test", a.measure, seed=cfg.run.seed, difficulty_mix=mix)] \
            if a.measure else []
        record = a.model.resolve().parent / "budget.json"  # the sft stage's, when there is one
        sft = Result(outputs={"model": str(a.model.resolve()),
                              **({"budget": str(record)} if record.is_file() else {})})
        budgets = rl.budgets_for(cfg.rl, sft)
        before = success(a.model, test, budgets) if test else {}
        out = root / "rl"
        out.mkdir()
        ctx = Context(run_id="bench", out=out, run=cfg.run, tracker=Tracker(root, enabled=False),
                      inputs={"sft": sft})
        res = rl.train(cfg.rl, ctx)
        hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
        timed = hist[1:] or hist  # the first step warms up
        step_s = sum(h["step_seconds"] for h in timed) / len(timed)
        gen_s = sum(h["generate_seconds"] for h in timed) / len(timed)
        per_step = cfg.rl.tasks_per_step * cfg.rl.num_generations
        report = {
            "steps": len(hist), "episodes_per_step": per_step,
            "seconds_per_step": round(step_s, 2), "generate_seconds": round(gen_s, 2),
            "train_seconds": round(step_s - gen_s, 2),
            "generate_share": round(gen_s / step_s, 3),
            "generate_to_train_ratio": round(gen_s / max(step_s - gen_s, 1e-9), 2),
            "episodes_per_second": round(per_step / step_s, 2),
            "rollout_success_by_step": [round(h.get("success", float("nan")), 3) for h in hist],
            "groups_dropped_by_step": [round(h.get("groups_dropped", float("nan")), 3)
                                       for h in hist],
            "model_tokens_per_episode": round(sum(h["model_tokens"] for h in hist) / len(hist), 1),
            "metrics": res.metrics,
        }
        if test:
            after = success(res.path("model"), test, budgets)
            report["heldout"] = {}
            for key in ("success", "evidence"):
                b, f = before[key], after[key]
                report["heldout"][key] = {"all": paired(b, f)}
                for s in cfg.rl.suites:
                    idx = [i for i, t in enumerate(test) if t.suite == s]
                    report["heldout"][key][s] = paired([b[i] for i in idx], [f[i] for i in idx])
        if a.keep:
            import shutil

            shutil.copytree(res.path("model"), a.keep, dirs_exist_ok=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
