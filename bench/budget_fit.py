"""Which share of the teacher's accepted runs a turn/token budget lets through, per suite.

    .venv/bin/python bench/budget_fit.py --gate work/runs/RUN/gate/accepted
    .venv/bin/python bench/budget_fit.py --gate G --budget 5x128 --budget 4x128 --budget 8x256

Each accepted run is rendered as the student sees it (``models.prompt.to_example``) and tokenized
by the student's tokenizer (``--model``, default the default profile's SmolLM2-135M-Instruct):
``(assistant turns, tokens of its longest turn)``. Prints, per budget and suite, the runs it fits,
then the budget ``agent.budget.derive`` picks (99 % of the runs, plus a turn and a tenth), on all
accepted runs and on those sft trains on (``--drop-recovered``, the default profile's setting).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", required=True, help="a gate stage's accepted/ folder")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the student (tokenizer)")
    ap.add_argument("--budget", action="append", default=[], help="TURNSxTOKENS, repeatable")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from coaflow.agent.budget import Budget, derive, fits, teacher_runs
    from coaflow.models.sources import resolve
    from coaflow.stages.sft_data import load_trajectories

    tok = AutoTokenizer.from_pretrained(resolve(args.model))
    trajs = load_trajectories(args.gate)
    sets = {"accepted": teacher_runs(trajs, tok),
            "trained on (drop_recovered)": teacher_runs(
                [t for t in trajs if not t.outcome.recovered], tok)}
    budgets = [Budget(*map(int, b.split("x"))) for b in args.budget] or [
        Budget(5, 128), Budget(4, 128), Budget(8, 256)]
    for label, runs in sets.items():
        print(f"\n{label}:")
        for suite, r in runs.items():
            turns = sorted(Counter(t for t, _ in r).items())
            longest = sorted(k for _, k in r)
            print(f"  {suite}: {len(r)} runs, turns {turns}, longest turn median "
                  f"{longest[len(longest) // 2]} p90 {longest[int(0.9 * len(longest))]} max "
                  f"{longest[-1]} tokens")
        for b in budgets:
            cells = [f"{s} {round(fits(r, b) * len(r))}/{len(r)} = {fits(r, b):.0%}"
                     for s, r in runs.items()]
            print(f"  {str(b):<22}" + "   ".join(cells))
        derived = {s: derive(r) for s, r in runs.items()}
        print("  derived: " + json.dumps({s: str(b) for s, b in derived.items()}))


if __name__ == "__main__":
    main()
