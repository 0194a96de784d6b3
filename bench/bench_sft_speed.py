"""SFT speed of the pretrained student: the sft stage vs the fastest bare PyTorch loop here.

    .venv/bin/python bench/bench_sft_speed.py --gate work/runs/RUN/gate/accepted
    .venv/bin/python bench/bench_sft_speed.py --gate G --steps 4 --set sft.batch_size=2

Three figures, side by side, on the same machine in one run:

1. **the ceiling**: the fp32 and bf16 throughput of the student's own matmul shape (2048 x 576 x
   1536) with the threads torch uses, and the tokens/s a training step (~6 FLOPs per parameter per
   token, attention aside) could reach at that rate;
2. **the bare loop**: forward, backward and an AdamW step over the stage's own collated batches,
   the LM head run on the trained positions only, in each precision mode this CPU runs natively
   (fp32 always; bf16 autocast and bf16 weights only with AVX-512 BF16 / AMX: emulated bf16 is
   ~100x slower); the fastest is the reference;
3. **the stage**: ``sft.build_trainer`` (TRL's SFTTrainer with coaflow's loss and sampler) on the
   same examples, timed by its own step callbacks.

Step 1 of each side is warm-up and not timed; tokens are the non-pad tokens of the timed steps.
Prints one JSON line per side and the ratio stage / bare loop (the issue's bar: >= 0.8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def matmul_gflops(dtype, n: int = 10) -> float:
    import torch

    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - start) / 1e9


def bare_loop(model_name: str, batches: list, lr: float, mode: str, accum: int = 1) -> dict:
    """The training step with nothing around it: ``mode`` fp32 | bf16-autocast | bf16; an
    optimizer step every ``accum`` micro-batches, as the stage's ``grad_accum``."""
    import torch

    from coaflow.models import load_model_and_tokenizer

    torch.manual_seed(0)
    model, _, _ = load_model_and_tokenizer(model_name)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast"):
            hidden = model.model(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
            target = batch["labels"][:, 1:]
            keep = target != -100
            logits = model.get_output_embeddings()(hidden[keep]).float()
            loss = torch.nn.functional.cross_entropy(logits, target[keep]) / accum
        loss.backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if i >= accum:  # the first optimizer step warms up
            tokens += int(batch["attention_mask"].sum())
    seconds = sum(times[accum:])
    return {"side": f"bare loop ({mode})", "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gate", required=True, help="a gate stage's accepted/ folder")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (+1 warm-up)")
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

    threads = torch.get_num_threads()
    native_bf16 = cpu_bf16()
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16, n=2)
    model, tok, _ = load_model_and_tokenizer(load_config(args.profile, args.set).sft.model)
    params = sum(p.numel() for p in model.parameters())
    ceiling = {"side": "ceiling", "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1),
               "native_bf16": native_bf16, "params": params,
               "tokens_per_second_bound": round(max(fp32, bf16 if native_bf16 else 0) * 1e9
                                                / (6 * params), 1)}

    cfg = load_config(args.profile, args.set).sft
    cfg = cfg.model_copy(update={"max_steps": args.steps + 1, "save_steps": 10**6,
                                 "logging_steps": 1, "warmup_ratio": 0.0})
    examples = [to_example(t) for t in load_trajectories(args.gate)]
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            marks.append(time.perf_counter())

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        trainer, history = sft.build_trainer(cfg, model, tok, examples, Path(out),
                                             callbacks=(Clock(),))
        batches = list(_take(trainer.get_train_dataloader(), (args.steps + 1) * cfg.grad_accum))
        trainer.train()
    by_step = [h["num_tokens"] for h in history if "num_tokens" in h and "loss" in h]
    stage_tokens = by_step[-1] - by_step[0]
    stage = {"side": "sft stage", "tokens": int(stage_tokens),
             "seconds": round(marks[-1] - marks[0], 2), "bf16": trainer.args.bf16}
    stage["tokens_per_second"] = round(stage_tokens / stage["seconds"], 1)

    modes = ["fp32", "bf16-autocast", "bf16"] if native_bf16 else ["fp32"]
    loops = [bare_loop(cfg.model, batches, cfg.lr, m, cfg.grad_accum) for m in modes]
    best = max(loops, key=lambda r: r["tokens_per_second"])
    for row in (ceiling, *loops, stage):
        print(json.dumps({**row, "batch_size": cfg.batch_size, "threads": threads}))
    print(f"sft stage / fastest bare loop ({best['side']}): "
          f"{stage['tokens_per_second'] / best['tokens_per_second']:.2f}; bare loop / ceiling "
          f"bound: {best['tokens_per_second'] / ceiling['tokens_per_second_bound']:.2f}")


def _take(loader, n: int):
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


if __name__ == "__main__":
    main()
