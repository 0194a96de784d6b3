"""Teacher throughput: scripted trajectories/s, and the LLM teacher at concurrency 16 vs 1.

    .venv/bin/python bench/bench_synthesize.py [--scripted 120] [--llm 32] [--latency 0.1]

The LLM teacher runs against a real local HTTP server that speaks the OpenAI chat API and answers
every request after a fixed latency (default 100 ms), so the ratio measures the client's
concurrency, not a model. Both runs happen side by side in one process, caches off.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.teachers.openai_server

from tests.teachers.openai_server import MODEL, FakeModel, serve  # noqa: E402

from coaflow.envs import make_tasks  # noqa: E402
from coaflow.stages.synthesize import Config, synthesize  # noqa: E402


def timed(cfg: Config, out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    res = synthesize(cfg, out, seed=0, progress=False)
    return time.perf_counter() - start, int(res.metrics["trajectories"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scripted", type=int, default=120, help="tasks per suite, scripted")
    ap.add_argument("--llm", type=int, default=32, help="calc tasks for the LLM teacher")
    ap.add_argument("--latency", type=float, default=0.1, help="server latency per request (s)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-synth-"))

    for suite in ("kbqa", "calc"):
        secs, n = timed(Config(suites={suite: args.scripted}), tmp / f"scripted-{suite}")
        print(f"scripted teacher, {suite:<4}: {n} trajectories in {secs:6.1f} s = "
              f"{n / secs:6.1f} trajectories/s")

    tasks = make_tasks("calc", "train", args.llm, seed=0)
    script = {t.question: {"tool": "python", "answer": t.answer,
                           "args": {"code": f"print({t.metadata['expression']})"}} for t in tasks}
    server, url = serve(FakeModel(script, latency_s=args.latency))
    rates = {}
    for conc in (1, 16):
        cfg = Config(teacher="llm", suites={"calc": args.llm},
                     llm={"base_url": url, "model": MODEL, "api_key_env": None,
                          "concurrency": conc, "cache": False})
        secs, n = timed(cfg, tmp / f"llm-{conc}")
        rates[conc] = n / secs
        print(f"llm teacher, concurrency {conc:>2}: {n} trajectories in {secs:6.1f} s = "
              f"{rates[conc]:6.2f} trajectories/s")
    server.shutdown()
    print(f"concurrency 16 vs 1: {rates[16] / rates[1]:.1f}x (latency {args.latency * 1000:.0f} ms"
          " per request, 6 requests per task)")


if __name__ == "__main__":
    main()
