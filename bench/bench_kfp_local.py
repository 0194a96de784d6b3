"""Benchmark: the same small pipeline through `coaflow run` (stages in one process) and
`coaflow run --engine kfp` (the Kubeflow pipeline on kfp.local: one executor subprocess per
task, which starts `coaflow stage`), side by side, with the ratio and the per-stage overhead.

    .venv/bin/python bench/bench_kfp_local.py              # the slow test's config (~16 runs)
    .venv/bin/python bench/bench_kfp_local.py --full       # the tiny profile as is (~20 min)

Each engine gets its own fresh workdir (no cross-engine cache hits); the order alternates with
--repeat so that machine load hits both alike. CPU time counts the children (the stage
processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.e2e.test_kfp_local import SMALL  # noqa: E402 - the slow test's config


def run(engine: str, workdir: Path, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "coaflow.cli", "run", "--engine", engine, "--workdir",
           str(workdir), "--run-id", engine, *overrides]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"{engine} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    run_dir = workdir / "runs" / engine
    stages = {p.name: json.loads((p / "result.json").read_text())["metrics"]["wall_seconds"]
              for p in sorted(run_dir.iterdir()) if (p / "result.json").exists()}
    keys = {s: (run_dir / s / ".complete").read_text() for s in stages}
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stages": stages, "keys": keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the tiny profile unchanged")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (order alternates)")
    args = ap.parse_args()
    overrides = [] if args.full else SMALL
    results: dict[str, list[dict]] = {"local": [], "kfp": []}
    for i in range(args.repeat):
        for engine in (("local", "kfp") if i % 2 == 0 else ("kfp", "local")):
            with tempfile.TemporaryDirectory(prefix=f"bench-kfp-{engine}-") as tmp:
                results[engine].append(run(engine, Path(tmp), overrides))
    best = {e: min(r, key=lambda x: x["wall"]) for e, r in results.items()}
    load = os.getloadavg()[0]
    print(f"config: {'tiny profile' if args.full else 'the slow test (small)'}; "
          f"best of {args.repeat}; load average {load:.1f} on {os.cpu_count()} cores")
    print(f"{'engine':<8}{'wall s':>9}{'cpu s':>9}  stage seconds (inside the stage)")
    for e, r in best.items():
        print(f"{e:<8}{r['wall']:>9.1f}{r['cpu']:>9.1f}  "
              + " ".join(f"{s}={v:.1f}" for s, v in r["stages"].items()))
    assert best["kfp"]["keys"] == best["local"]["keys"], "the engines computed different keys"
    ratio = best["kfp"]["wall"] / best["local"]["wall"]
    inside = {e: sum(r["stages"].values()) for e, r in best.items()}
    per_task = (best["kfp"]["wall"] - inside["kfp"]) / max(len(best["kfp"]["stages"]), 1)
    print(f"kfp.local / coaflow run wall time: {ratio:.2f}x; same stage keys; "
          f"kfp overhead outside the stages: {per_task:.1f} s per task")


if __name__ == "__main__":
    main()
