"""Which model leaves the rl stage: the trained policy only if it beats the sft model on the
validation split; otherwise the sft model goes on as the candidate, and the stage says why.

The choice never looks at the test split (evaluate's alone): ``rl.select_suites`` tasks of the
``validation`` split (same generators, disjoint from train, rl and test by question hash), both
models greedy, whole episodes within the run's budget, paired task by task (evaluate's own
``run_model`` and ``compare``; rows are cached across runs like evaluate's, so the sft model's
row of an unchanged sft model costs nothing the second time). The policy is kept when its
success over all validation tasks is more than ``rl.select_margin`` above the sft model's and no
suite lost more than ``rl.select_max_drop``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from coaflow.contract import PipelineError


def validation_tasks(suites: dict[str, int], seed: int) -> list:
    from coaflow.envs import make_tasks

    try:
        return [t for s, n in suites.items() if n for t in make_tasks(s, "validation", n,
                                                                       seed=seed)]
    except ValueError as e:
        raise PipelineError(f"rl.select_suites: {e}") from None


def judge(cfg, sft_model: Path, policy: Path, budgets: dict, seed: int, cache: Path | None
          ) -> dict:
    """The paired validation comparison of ``policy`` against ``sft_model`` and the verdict:
    ``{"chosen": "policy" | "sft", "why", "success", "compare"}``."""
    from coaflow.stages import evaluate as E

    tasks = validation_tasks(cfg.select_suites, seed)
    ev = E.Config(suites={s: n for s, n in cfg.select_suites.items() if n},
                  batch_size=cfg.select_batch_size, threads=cfg.rollout_threads,
                  dtype=cfg.rollout_dtype, transcripts=0)
    rows: dict[str, list] = {"sft": [], "policy": []}
    for name, spec in (("sft", sft_model), ("policy", policy)):
        for suite in ev.suites:  # a suite at a time: every live episode keeps its KV cache
            mine = [t for t in tasks if t.suite == suite]
            trajs, _ = E.run_model(str(spec), mine, ev, budgets=budgets, registry_uri=None,
                                   seed=seed, cache=cache,
                                   field=f"rl: validation, {name} model, {suite}")
            rows[name] += [E.outcome_row(name, t) for t in trajs]
    cmp = E.compare(rows["policy"], rows["sft"], ev.bootstrap, seed)
    success = {name: {s: sum(r["success"] for r in rs if r["suite"] == s)
                      for s in ev.suites} for name, rs in rows.items()}
    chosen, why = verdict(cmp, len(tasks), cfg.select_margin, cfg.select_max_drop)
    return {"chosen": chosen, "why": why, "tasks": len(tasks), "success": success,
            "compare": cmp}


def verdict(cmp: dict, n: int, margin: float, max_drop: float) -> tuple[str, str]:
    """``(chosen, why)`` from the paired comparison ``cmp`` (evaluate.compare: policy - sft per
    suite and ``all``): the policy only when it gained more than ``margin`` over all ``n`` tasks
    and no suite lost more than ``max_drop``.

    >>> verdict({"kbqa": {"diff": 0.1}, "all": {"diff": 0.05}}, 60, 0.0, 0.05)[0]
    'policy'
    >>> verdict({"kbqa": {"diff": 0.2}, "calc": {"diff": -0.1}, "all": {"diff": 0.05}},
    ...         60, 0.0, 0.05)[1]
    'rl skipped: the rl policy did not beat the sft model on 60 validation tasks (+5.0% over all, needs more than +0.0%; calc fell by more than 5%); the sft model is the candidate'
    """
    gain = cmp["all"]["diff"]
    drops = [s for s, d in cmp.items() if s != "all" and d["diff"] < -max_drop]
    if gain > margin and not drops:
        return "policy", (f"the rl policy beat the sft model on {n} validation tasks by "
                          f"{gain:+.1%} (paired)")
    return "sft", (f"rl skipped: the rl policy did not beat the sft model on {n} validation "
                   f"tasks ({gain:+.1%} over all, needs more than {margin:+.1%}"
                   + (f"; {', '.join(drops)} fell by more than {max_drop:.0%}" if drops else "")
                   + "); the sft model is the candidate")


def copy_model(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` (written beside and renamed in, as every stage output)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def finish(cfg, ctx, sft_model: Path, policy: Path | None, budgets: dict, why: str = ""
           ) -> tuple[Path, dict]:
    """``(model folder the stage outputs, decision)``: ``<stage>/model`` is the chosen model;
    a policy that lost is kept in ``<stage>/policy`` for inspection. ``policy`` None: no rl
    ran (``why`` says why) and the sft model goes on."""
    out = ctx.out / "model"
    if policy is None:
        return copy_model(sft_model, out), {"chosen": "sft", "why": why}
    if not cfg.select:
        decision = {"chosen": "policy", "why": "rl.select is off: the rl policy goes on unjudged"}
    else:
        cache = Path(ctx.run.workdir) / "cache" / "evaluate"
        decision = judge(cfg, sft_model, policy, budgets, ctx.run.seed, cache)
    if decision["chosen"] == "policy":
        if Path(policy).resolve() != out.resolve():
            copy_model(policy, out)
        return out, decision
    kept = ctx.out / "policy"
    if Path(policy).resolve() != kept.resolve():
        copy_model(policy, kept)
    decision["policy"] = str(kept)
    return copy_model(sft_model, out), decision
