"""Benchmark: BM25 search queries/s over a kbqa world, and sandboxed python calls/s.

    .venv/bin/python bench/bench_envs.py                  # ~30 s on 2 cores
    .venv/bin/python bench/bench_envs.py --entities 2000 --calls 20

Search: the index is built once (timed separately), then ``--queries`` queries taken from the
world's own questions go through the real ``search`` tool (BM25 + snippets), one at a time, as an
agent would send them. Sandbox: ``--calls`` sequential ``run_python("print(6*7)")`` calls, each a
fresh namespace, chroot and interpreter; then the same with ``--workers`` threads in parallel.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=1000, help="kbqa world size")
    ap.add_argument("--queries", type=int, default=2000, help="search queries to time")
    ap.add_argument("--calls", type=int, default=40, help="sandbox calls to time")
    ap.add_argument("--workers", type=int, default=4, help="threads for the parallel sandbox run")
    args = ap.parse_args()

    from coaflow import envs
    from coaflow.envs import environments, kbqa
    from coaflow.envs.sandbox import run_python

    t = time.perf_counter()
    kbqa.build_world(0, args.entities)
    t_world = time.perf_counter() - t
    t = time.perf_counter()
    environments.search_index(0, args.entities)
    t_index = time.perf_counter() - t
    tasks = envs.make_tasks("kbqa", "train", 200, n_entities=args.entities)
    queries = [q for task in tasks for q in (task.question, task.metadata["hops"][0]["subject"])]
    t = time.perf_counter()
    for i in range(args.queries):
        environments.search(0, args.entities, queries[i % len(queries)])
    qps = args.queries / (time.perf_counter() - t)
    print(f"kbqa world: {args.entities} entities built in {t_world:.2f} s, "
          f"BM25 index in {t_index:.2f} s")
    print(f"search: {qps:,.0f} queries/s ({1000 / qps:.2f} ms/query, top-5 with snippets)")

    run_python("print(1)")  # warm the page cache
    t = time.perf_counter()
    for _ in range(args.calls):
        res = run_python("print(6*7)")
        assert res.stdout == "42\n", res
    seq = args.calls / (time.perf_counter() - t)
    t = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        outs = list(pool.map(lambda _: run_python("print(6*7)").stdout, range(args.calls)))
    assert outs == ["42\n"] * args.calls
    par = args.calls / (time.perf_counter() - t)
    print(f"sandbox: {seq:.1f} calls/s sequential ({1000 / seq:.0f} ms/call), "
          f"{par:.1f} calls/s with {args.workers} threads")


if __name__ == "__main__":
    main()
