"""Benchmark: sandboxed python call latency, this tree against a baseline commit.

    .venv/bin/python bench/bench_sandbox.py                    # against main, ~20 s on 2 cores
    .venv/bin/python bench/bench_sandbox.py --baseline HEAD~3 --calls 60

The baseline's ``sandbox.py`` and ``_sandbox_init.py`` are taken from git (``git show``) into a
temporary folder and imported from there, so both versions run in this process, on the same
interpreter and machine. Calls alternate between the two (baseline, current, baseline, ...) so
that load from other processes hits both alike; the script prints the median and the 90th
percentile per version and the ratio current / baseline (below 1: faster than the baseline).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
FILES = ("sandbox.py", "_sandbox_init.py")


def load_baseline(ref: str, folder: Path):
    """The sandbox module of commit ``ref``, importable next to the current one."""
    for name in FILES:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:src/coaflow/envs/{name}"],
                              check=True, capture_output=True, text=True).stdout
        (folder / name).write_text(text)
    spec = importlib.util.spec_from_file_location("sandbox_baseline", folder / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="main", help="git ref to compare against")
    ap.add_argument("--calls", type=int, default=40, help="calls per version")
    ap.add_argument("--code", default="print(6 * 7)", help="the snippet each call runs")
    args = ap.parse_args()

    from coaflow.envs import sandbox as current

    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline(args.baseline, Path(tmp))
        versions = {"baseline": baseline.run_python, "current": current.run_python}
        for run in versions.values():  # warm the page cache and the interpreter
            assert run(args.code).exit_code == 0
        times: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(args.calls):
            for name, run in versions.items():
                t = time.perf_counter()
                res = run(args.code)
                times[name].append(time.perf_counter() - t)
                assert res.exit_code == 0 and res.error is None, (name, res)
    for name, ts in times.items():
        ts.sort()
        print(f"{name:<9} median {statistics.median(ts) * 1000:7.1f} ms   "
              f"p90 {ts[int(0.9 * (len(ts) - 1))] * 1000:7.1f} ms   ({len(ts)} calls)")
    ratio = statistics.median(times["current"]) / statistics.median(times["baseline"])
    print(f"ratio current/baseline (median): {ratio:.2f}")


if __name__ == "__main__":
    main()
