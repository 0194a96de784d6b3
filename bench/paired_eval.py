"""Two models on the same test tasks, whole episodes, and the paired difference per suite.

What the rl issue asks of rl: success after rl minus success after sft, on the same tasks, within
the same (fair) budget, with a paired 95 % interval (bootstrap over tasks) and McNemar's exact
p-value.

    python bench/paired_eval.py --a RUN/sft/model --b RUN/rl/model --n 60 --threads 1

The budget is the one the sft stage derived from the teacher runs it trained on (``budget.json``
beside ``--a``; ``agent.budget.DEFAULTS`` without one), as evaluate's. Rows come from evaluate's
cross-run row cache (``--workdir``/cache/evaluate) when the same model ran on the same tasks
before. Prints the table and the comparison; ``--json FILE`` appends the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="baseline model folder (e.g. the sft model)")
    ap.add_argument("--b", required=True, help="model compared with it (e.g. the rl model)")
    ap.add_argument("--n", type=int, default=60, help="test tasks per suite")
    ap.add_argument("--suites", default="kbqa,calc")
    ap.add_argument("--split", default="test", help="test, or validation (rl's choice)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while generating")
    ap.add_argument("--workdir", default="work", help="its cache/evaluate holds the row cache")
    ap.add_argument("--out", default="/tmp/paired_eval")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)

    from coaflow.agent.budget import read_record
    from coaflow.config import load_config
    from coaflow.envs import make_tasks
    from coaflow.stages import evaluate as E

    cfg = load_config("default", [])
    ev = cfg.evaluate.model_copy(update={"suites": {s: args.n for s in args.suites.split(",")},
                                         "threads": args.threads})
    tasks = [t for s, n in ev.suites.items() for t in make_tasks(s, args.split, n,
                                                                  seed=cfg.run.seed)]
    budgets, fit = E.budgets_for(ev, read_record(Path(args.a).resolve().parent / "budget.json"))
    rows, summary = E.evaluate({"a": args.a, "b": args.b}, tasks, ev, Path(args.out),
                               seed=cfg.run.seed, budgets=budgets, fit=fit, tokenizer=args.a,
                               cache=Path(args.workdir).resolve() / "cache" / "evaluate")
    diff = E.compare([r for r in rows if r["model"] == "b"], [r for r in rows if r["model"] == "a"],
                     ev.bootstrap, cfg.run.seed)
    print(E.markdown(summary))
    for suite, d in diff.items():
        print(f"b - a  {suite:5s} {d['diff']:+.3f}  95% CI [{d['lo']:+.3f}, {d['hi']:+.3f}]  "
              f"p={d['p_value']:.3g}  (b only {d['only_candidate']}, a only {d['only_other']}, "
              f"n={d['n']})")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"a": args.a, "b": args.b, "split": args.split,
                                "budget": {s: str(b) for s, b in budgets.items()},
                                "table": summary["table"], "diff": diff}) + "\n")


if __name__ == "__main__":
    main()
