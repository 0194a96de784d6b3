"""Benchmark: N trajectories through the whole gate (validators, filters, dedup, decontamination,
Great Expectations with Data Docs), and the share of time spent in GX vs the Python checks.

    .venv/bin/python bench/bench_gate.py               # 100k trajectories (target: < 60 s)
    .venv/bin/python bench/bench_gate.py --n 5000      # a quick run

The input (kbqa and calc chain-of-agents runs from tests/gates/factory.py, with 10% wrong answers,
2% exact copies and a few unreadable lines, in 10k-line shards) is generated first and not timed;
it is cached under --data between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def make_input(folder: Path, n: int, shard: int = 10_000) -> Path:
    from tests.gates.factory import calc, kbqa

    done = folder / f"n{n}.done"
    if done.exists():
        return folder / f"n{n}"
    out = folder / f"n{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.time()
    fh = None
    for i in range(n):
        if i % shard == 0:
            if fh:
                fh.close()
            fh = open(out / f"part-{i // shard:05d}.jsonl", "w", encoding="utf-8")
        if i % 1000 == 999:
            fh.write('{"id": "broken", "task": {"suite": "kbqa"\n')  # a truncated line
            continue
        src = i - 1 if i % 50 == 49 else i  # 2% exact copies of the previous run
        traj = (kbqa if src % 2 == 0 else calc)(src, correct=src % 10 != 3, seed=0)
        fh.write(traj.model_dump_json() + "\n")
    fh.close()
    done.write_text("")
    print(f"generated {n} trajectories in {time.time() - t:.1f}s -> {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="trajectories (default 100k)")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "coaflow-bench-gate"),
                    help="cache folder for the generated input")
    ap.add_argument("--workers", type=int, default=2, help="gate.workers (default 2: the cores)")
    ap.add_argument("--no-docs", action="store_true", help="skip the Data Docs HTML")
    args = ap.parse_args()

    from coaflow.stages.gate import Config

    src = make_input(Path(args.data), args.n)
    out = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    cfg = Config(data_docs=not args.no_docs, workers=args.workers)
    load = os.getloadavg()[0]
    t, cpu = time.perf_counter(), time.process_time()
    from coaflow.gates.core import gate

    report = gate(src, out, cfg, log=lambda *_: None)
    total = time.perf_counter() - t
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu + children.ru_utime + children.ru_stime
    tm = report["timings"]
    gx, py = tm["great_expectations"], tm["python_total"]
    print(f"gate: {report['in']} in -> {report['accepted']} accepted "
          f"({report['accepted_fraction']:.1%}); rejected {json.dumps(report['reasons'])}")
    print(f"total {total:.1f}s wall on {os.cpu_count()} cores ({report['in'] / total:,.0f} traj/s); "
          f"{cpu:.1f} CPU-seconds; load average before the run {load:.1f} (other jobs on the "
          "machine stretch the wall time)")
    print(f"  python validators+filters+io {py:.1f}s ({py / total:.0%})  "
          f"[read/parse {tm['read_parse']:.1f}s, checks {tm['validate_filter']:.1f}s, "
          f"dedup {tm['dedup']:.1f}s, write {tm['write']:.1f}s; CPU seconds summed over "
          f"{args.workers} worker(s)], merge+dedup index+write {tm['merge_dedup_write']:.1f}s")
    imp = tm.get("gx_import_overlapped", 0.0)
    print(f"  great expectations            {gx:.1f}s ({gx / total:.0%}) after the checks, plus "
          f"{imp:.1f}s importing GX in a thread while the checks ran (GX share at most "
          f"{(gx + imp) / total:.0%})")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
