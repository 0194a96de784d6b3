"""Benchmark: reading N small records as one pretty-printed JSON array vs the same records as
JSONL, side by side, with ``coaflow.schema.io.iter_records`` (raw dicts: the read, not the
schema). The array is read as a stream, so the ratio must stay under ~2x at any N; it was
quadratic before (100k records: 22 s).

    .venv/bin/python bench/bench_io_array.py              # 100k records
    .venv/bin/python bench/bench_io_array.py --n 200000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]


def timed_read(path: Path) -> tuple[float, int]:
    from coaflow.schema.io import iter_records

    start = time.perf_counter()
    n = sum(1 for _ in iter_records(path, None))
    return time.perf_counter() - start, n


def measure(n: int, folder: Path) -> dict:
    """Seconds to read ``n`` records as an array and as JSONL, and their ratio."""
    records = [{"id": f"r{i}", "question": f"what is {i}?", "answer": str(i)} for i in range(n)]
    array, lines = folder / "records.json", folder / "records.jsonl"
    array.write_text(json.dumps(records, indent=2))
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    t_array, n_array = timed_read(array)
    t_lines, n_lines = timed_read(lines)
    assert n_array == n_lines == n, (n_array, n_lines)
    return {"n": n, "array_s": round(t_array, 3), "jsonl_s": round(t_lines, 3),
            "ratio": round(t_array / t_lines, 2), "array_mb": round(array.stat().st_size / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="records")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        r = measure(args.n, Path(d))
    print(f"{r['n']:,} records: JSON array {r['array_s']:.2f} s ({r['array_mb']} MB), JSONL "
          f"{r['jsonl_s']:.2f} s: array/JSONL = {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
