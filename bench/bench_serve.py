"""Benchmark: ``coaflow serve`` with 1 and with 8 concurrent clients: tokens/s, p50/p95 latency.

    .venv/bin/python bench/bench_serve.py                                   # the tiny champion
    .venv/bin/python bench/bench_serve.py --model work/runs/RUN/sft/model --requests 16
    .venv/bin/python bench/bench_serve.py --model tiny      # an untrained tiny-profile model

Starts a real server (transformers engine, its request batching) on a free port, sends kbqa test
questions with the suite's tools through the ``openai`` client (greedy, ``--max-tokens``): first
``--requests`` one after another from one client, then ``--requests`` from each of ``--clients``
clients at once. Prints both side by side (``batch``: mean sequences per generate call) and
the ratio of tokens/s (the batching figure).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(out: Path) -> Path:
    """An untrained model of the tiny profile's sizes (same cost per token as the trained one)."""
    from coaflow.config import load_config
    from coaflow.envs import make_tasks
    from coaflow.models import build_tiny

    corpus = [t.question for s in ("kbqa", "calc") for t in make_tasks(s, "train", 600)]
    return build_tiny(out, corpus, load_config("tiny").sft.tiny)


async def one_client(client, questions, tools, max_tokens) -> list[tuple[float, int]]:
    out = []
    for q in questions:
        t = time.perf_counter()
        r = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": q}], tools=tools,
            max_tokens=max_tokens, temperature=0)
        out.append((time.perf_counter() - t, r.usage.completion_tokens))
    return out


async def phase(url: str, clients: int, questions, tools, max_tokens) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=600) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(one_client(client, questions, tools, max_tokens)
                                      for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = sorted(x for c in done for x, _ in c)
    tokens = sum(n for c in done for _, n in c)
    return {"clients": clients, "requests": len(lat), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(lat),
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))]}


def batches(url: str) -> tuple[float, float]:
    """(generate calls, sequences generated) so far, from the server's /metrics."""
    import httpx

    values = dict(line.split() for line in httpx.get(f"{url}/metrics").text.splitlines()
                  if line.startswith(("coaflow_batches_total ", "coaflow_batched_sequences_total ")))
    return float(values["coaflow_batches_total"]), float(values["coaflow_batched_sequences_total"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models:/coaflow-agent@champion",
                    help="models:/NAME@ALIAS, a model folder, or 'tiny' (untrained, built here)")
    ap.add_argument("--workdir", default="work", help="workdir of the registry")
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients in phase two")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = ap.parse_args()

    import httpx

    from coaflow.envs import make_tasks, tool_schemas

    tmp = tempfile.TemporaryDirectory()
    model = str(tiny_model(Path(tmp.name) / "tiny")) if args.model == "tiny" else args.model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "coaflow.cli", "serve", model, "--port",
                             str(port), "--engine", "transformers", "--name", "bench",
                             "--workdir", args.workdir, "--max-batch", str(max(16, args.clients)),
                             "--threads", str(args.threads)],
                            env=env)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not become healthy in 300 s")
            time.sleep(0.5)
        questions = [t.question for t in make_tasks("kbqa", "test", args.requests)]
        tools = tool_schemas("kbqa")
        asyncio.run(phase(url, 1, questions[:1], tools, 8))  # warm-up
        rows = []
        for c in (1, args.clients):
            before = batches(url)
            rows.append(asyncio.run(phase(url, c, questions, tools, args.max_tokens)))
            after = batches(url)
            rows[-1]["batch"] = (after[1] - before[1]) / max(1, after[0] - before[0])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    print(f"\nmodel {args.model}, {args.requests} requests per client, max_tokens "
          f"{args.max_tokens}, greedy, kbqa test questions with tools")
    print(f"{'clients':>8} {'requests':>9} {'tokens':>8} {'wall s':>8} {'tokens/s':>9} "
          f"{'p50 s':>7} {'p95 s':>7} {'batch':>6}")
    for r in rows:
        print(f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>8} {r['wall_s']:>8.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {r['batch']:>6.1f}")
    print(f"tokens/s ratio {args.clients}:1 = {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
