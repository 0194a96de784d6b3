"""SFT speed of the pretrained student: the sft stage's trainer vs a bare PyTorch loop, same rows.

    .venv/bin/python bench/bench_sft_speed.py --gate work/runs/RUN/gate/accepted
    .venv/bin/python bench/bench_sft_speed.py --gate G --steps 8 --set sft.batch_size=2

Both train the same model (``sft.model`` of the profile, default SmolLM2-135M-Instruct) on the same
examples in the same order, batch by batch: first ``sft.build_trainer`` (TRL's SFTTrainer with
coaflow's options, bf16 autocast where the CPU has it), then a loop of forward / backward / AdamW
step over the trainer's own collated batches (the same padding, the same bf16 autocast). Tokens
are the non-pad tokens of the timed steps; step 1 of each is warm-up and not timed. Prints one
JSON line per side and the ratio (the issue's target: the stage at >= 80 % of the bare loop).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", required=True, help="a gate stage's accepted/ folder")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side (+1 warm-up)")
    ap.add_argument("--set", action="append", default=[], help="config override")
    args = ap.parse_args()

    import torch
    from transformers import TrainerCallback

    from coaflow.config import load_config
    from coaflow.models import load_model_and_tokenizer
    from coaflow.models.loading import cpu_bf16
    from coaflow.models.prompt import to_example
    from coaflow.stages import sft
    from coaflow.stages.sft_data import load_trajectories

    cfg = load_config(args.profile, args.set).sft
    cfg = cfg.model_copy(update={"max_steps": args.steps + 1, "save_steps": 10**6,
                                 "logging_steps": 1, "warmup_ratio": 0.0})
    examples = [to_example(t) for t in load_trajectories(args.gate)]
    bf16 = cfg.bf16 and cpu_bf16()
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())

    torch.manual_seed(0)
    model, tok, _ = load_model_and_tokenizer(cfg.model)
    with tempfile.TemporaryDirectory() as out:
        trainer, history = sft.build_trainer(cfg, model, tok, examples, Path(out),
                                             callbacks=(Clock(),))
        batches = list(_take(trainer.get_train_dataloader(), args.steps + 1))
        trainer.train()
    by_step = [h["num_tokens"] for h in history if "num_tokens" in h and "loss" in h]
    stage_tokens = by_step[-1] - by_step[0]
    stage = {"side": "sft stage", "tokens": int(stage_tokens),
             "seconds": round(marks[-1] - marks[0], 2)}
    stage["tokens_per_second"] = round(stage_tokens / stage["seconds"], 1)

    torch.manual_seed(0)
    model, _, _ = load_model_and_tokenizer(cfg.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if i:
            tokens += int(batch["attention_mask"].sum())
    bare = {"side": "bare loop", "tokens": tokens, "seconds": round(sum(times[1:]), 2)}
    bare["tokens_per_second"] = round(tokens / bare["seconds"], 1)
    for row in (stage, bare):
        print(json.dumps({**row, "bf16": bf16, "batch_size": cfg.batch_size,
                          "threads": torch.get_num_threads()}))
    print(f"sft stage / bare loop: {stage['tokens_per_second'] / bare['tokens_per_second']:.2f}")


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


if __name__ == "__main__":
    main()
