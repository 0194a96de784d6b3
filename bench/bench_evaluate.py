"""Benchmark: agent episodes/s, batched across episodes vs one episode at a time, or with each
episode's KV cache kept across turns vs the whole prompt re-encoded every turn (and, with an
endpoint, the HTTP backend at concurrency 1 vs 16).

    .venv/bin/python bench/bench_evaluate.py --model work/runs/RUN/sft/model      # ~2 min, 2 cores
    .venv/bin/python bench/bench_evaluate.py --model M --compare reuse --dtype bfloat16
    .venv/bin/python bench/bench_evaluate.py --model M --endpoint http://127.0.0.1:8000/v1

The same test-split tasks (half kbqa, half calc) run through ``coaflow.agent.run_episodes``
greedy with the real tools, first with ``TransformersBackend(batch_size=--batch)``, then with
``batch_size=1``, side by side in one process and one thread budget; it prints episodes/s, generated
tokens/s, the ratio, and whether both produced the same episodes (they should: greedy decoding,
left padding with an attention mask). With ``--endpoint`` the same for ``OpenAIBackend``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def timed(backend, tasks, args) -> tuple[float, list]:
    from coaflow.agent import run_episodes

    t = time.perf_counter()
    trajs = run_episodes(backend, tasks, max_turns=args.turns, max_new_tokens=args.tokens)
    return time.perf_counter() - t, trajs


def line(label: str, seconds: float, trajs: list) -> str:
    tokens = sum(t.details["tokens"] for t in trajs)
    return (f"{label:<28} {len(trajs) / seconds:7.2f} episodes/s  {tokens / seconds:8.0f} tokens/s"
            f"  ({seconds:.1f} s, {tokens} tokens, {sum(t.details['turns'] for t in trajs)} turns)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained student folder (sft's model/)")
    ap.add_argument("--tasks", type=int, default=32, help="episodes (half kbqa, half calc)")
    ap.add_argument("--batch", type=int, default=16, help="batch size of the batched run")
    ap.add_argument("--turns", type=int, default=6, help="turn budget per episode")
    ap.add_argument("--tokens", type=int, default=160, help="token budget per turn")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads while generating")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the folder's)")
    ap.add_argument("--compare", choices=["batch", "reuse"], default="batch",
                    help="batch: batch --batch vs 1; reuse: KV cache across turns vs re-encoding")
    ap.add_argument("--endpoint", help="also time OpenAIBackend against this /v1 URL")
    args = ap.parse_args()

    import torch

    from coaflow.agent import OpenAIBackend, TransformersBackend
    from coaflow.envs import make_tasks

    half = args.tasks // 2
    tasks = make_tasks("kbqa", "test", half, seed=0) + make_tasks("calc", "test",
                                                                  args.tasks - half, seed=0)
    print(f"{args.tasks} episodes, <= {args.turns} turns x {args.tokens} tokens, "
          f"torch threads {args.threads or torch.get_num_threads()}")
    def backend(batch: int, reuse: bool = True):
        b = TransformersBackend(args.model, batch_size=batch, threads=args.threads,
                                dtype=args.dtype)
        b.prefix_cache = reuse
        return b

    batched_s, batched = timed(backend(args.batch), tasks, args)
    print(line(f"transformers batch {args.batch}", batched_s, batched))
    if args.compare == "batch":
        other_s, other = timed(backend(1), tasks, args)
        print(line("transformers batch 1", other_s, other))
        label = "batched / sequential"
    else:
        other_s, other = timed(backend(args.batch, reuse=False), tasks, args)
        print(line(f"batch {args.batch}, re-encoding", other_s, other))
        label = "KV reuse / re-encoding"
    same = sum(a.content == b.content for a, b in zip(batched, other, strict=True))
    print(f"{label}: {other_s / batched_s:.2f}x episodes/s; "
          f"identical episodes: {same}/{len(tasks)}")
    if args.endpoint:
        one_s, one = timed(OpenAIBackend(args.endpoint, concurrency=1), tasks, args)
        print(line("http concurrency 1", one_s, one))
        many_s, many = timed(OpenAIBackend(args.endpoint, concurrency=16), tasks, args)
        print(line("http concurrency 16", many_s, many))
        print(f"http 16 / 1: {one_s / many_s:.2f}x episodes/s")


if __name__ == "__main__":
    main()
