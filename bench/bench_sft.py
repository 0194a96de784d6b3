"""SFT throughput on the tiny profile: trained tokens per second with and without packing.

    .venv/bin/python bench/bench_sft.py            # 300 trajectories, 20 steps each way
    .venv/bin/python bench/bench_sft.py --steps 40 --trajectories 500 --set sft.batch_size=4

Builds the tiny model of the profile's ``sft.tiny`` sizes from synthetic chain-of-agents
trajectories (kbqa search/open_page, calc python; tests/models/coa_trajectories.py), then runs the
stage's own ``build_trainer`` twice on the same data: padded batches, then BFD packing
(padding-free). Tokens counted are real (non-pad) tokens the model saw, TRL's ``num_tokens``;
the first step (warm-up) is left out of the timing. Prints one JSON line per mode and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))


def measure(cfg, model_dir: Path, examples: list[dict], steps: int, packing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from coaflow.stages import sft

    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), state.global_step))

    torch.manual_seed(0)
    run_cfg = cfg.model_copy(update={"packing": packing, "max_steps": steps, "save_steps": 10**6,
                                     "logging_steps": 1})
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as out:
        trainer, history = sft.build_trainer(run_cfg, model, tok, examples, Path(out),
                                             callbacks=(Clock(),))
        trainer.train()
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h and "loss" in h]
    # num_tokens is cumulative; step 1 is warm-up, so time steps 2..N against their tokens
    t0, t1 = marks[0][0], marks[-1][0]
    by_step = {h["step"]: h["num_tokens"] for h in history if "num_tokens" in h and "loss" in h}
    timed_tokens = by_step[marks[-1][1]] - by_step[marks[0][1]]
    return {"packing": packing, "steps": steps, "rows": len(trainer.train_dataset),
            "tokens": int(tokens[-1]), "seconds": round(t1 - t0, 2),
            "tokens_per_second": round(timed_tokens / (t1 - t0), 1),
            "loss_last": history[-2].get("loss") if len(history) > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectories", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--set", action="append", default=[], help="config override, as in the CLI")
    args = ap.parse_args()

    from coa_trajectories import make_trajectories

    from coaflow.config import load_config
    from coaflow.models import CHAT_TEMPLATE, build_tiny
    from coaflow.models.prompt import render, to_example

    cfg = load_config(args.profile, ["tracking.enabled=false", *args.set]).sft
    examples = [to_example(t) for t in make_trajectories(args.trajectories, seed=0)]
    with tempfile.TemporaryDirectory() as d:
        model_dir = build_tiny(Path(d) / "base", [render(e, CHAT_TEMPLATE) for e in examples],
                               cfg.tiny)
        results = [measure(cfg, model_dir, examples, args.steps, packing)
                   for packing in (False, True)]
    for r in results:
        print(json.dumps(r))
    ratio = results[1]["tokens_per_second"] / results[0]["tokens_per_second"]
    print(json.dumps({"bench": "sft_tokens_per_second", "profile": args.profile,
                      "hidden_size": cfg.tiny.hidden_size, "layers": cfg.tiny.num_hidden_layers,
                      "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                      "padded": results[0]["tokens_per_second"],
                      "packed": results[1]["tokens_per_second"],
                      "packed_over_padded": round(ratio, 2)}))


if __name__ == "__main__":
    main()
