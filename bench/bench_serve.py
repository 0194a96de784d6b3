"""Benchmark: ``coaflow serve`` under one client and under many: tokens/s, latency, and how long a
short request waits meanwhile.

    .venv/bin/python bench/bench_serve.py --model student                 # agent load (default)
    .venv/bin/python bench/bench_serve.py --model student --load greedy   # the greedy clients
    .venv/bin/python bench/bench_serve.py --model tiny --load short       # short questions
    .venv/bin/python bench/bench_serve.py --model models:/coaflow-agent@champion --workdir work

Starts a real server (``--engine transformers``) on a free port and talks to it through the
``openai`` client. ``--model``: ``student`` (the default student, SmolLM2-135M-Instruct, from the
model cache), ``tiny`` (an untrained tiny-profile model, built here), a folder or a registry URI.

``--load agent`` (the issue-32 load): each client runs multi-turn agent episodes with the kbqa
tools in the request: a context of about ``--context`` tokens (system prompt, tool schemas, the
question, earlier search results and a page), then ``--turns`` turns, each generating a random
64-256 tokens (``ignore_eos``, greedy) and appending the reply and a new search result to the
context. First one client, then ``--clients`` at once (``2,4,8``: a phase each, the curve);
each phase runs episodes of its own, and a prober sends a short request (one user word,
``max_tokens`` 4) every ~2 s. Printed side by side: completion tokens/s and the ratio to one
client, request latency p50/p95, the mean batch and decode step, the prompt tokens encoded and
reused, the seconds spent encoding and decoding (a newer server's /metrics), the short request's
p50/p95 under that load, and the issue's target: ``--clients`` clients >= 5x one client's
tokens/s, and the short request's p95 within what it costs alone (its prefill and 4 steps) plus
one decode step and one prefill chunk of another request under load.

``--load greedy``: the short request's p50/p95 (10 in a row) while (a) one client streams 3,900
tokens and (b) one asks ``n: 16`` of 3,800 tokens. ``--load short``: kbqa questions, one client
then ``--clients`` (the batching figure).

``--src`` serves another checkout's ``src`` (``git worktree add /tmp/base main``, then
``--src /tmp/base/src``): the same load against the code before a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


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


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1)."""
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)] if v else float("nan")


def metrics(url: str) -> dict[str, float]:
    """The server's unlabelled counters (an older server lacks some: absent, not zero)."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r"^(coaflow_\w+) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


# --- agent episodes -------------------------------------------------------------------------

def episode_start(client: int, episode: int, context: int, tokenizer, tools) -> list[dict]:
    """The messages of an episode some turns in: the question, searches and a page read, grown
    with further search results until the rendered prompt reaches about ``context`` tokens."""
    from coaflow.envs import make_tasks
    from coaflow.envs.environments import KBQAEnv

    tasks = make_tasks("kbqa", "test", 64, seed=1)
    task = tasks[(client * 7 + episode) % len(tasks)]
    env = KBQAEnv()
    messages = [{"role": "system", "content": "You are a team of agents in one model: plan, "
                 "search, read and answer."}, {"role": "user", "content": task.question}]
    words = [w.strip("?,.'") for w in task.question.split() if w[:1].isupper()] or ["city"]
    k = 0
    while len(tokenizer(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=True))["input_ids"]
              ) < context - 120:
        query = " ".join(words[k % len(words):][:2])
        found = env.search(query)
        title = found.split("\n")[0].split(". ", 1)[-1].split(":")[0]
        name, arg = ("search", {"query": query}) if k % 2 == 0 else ("open_page",
                                                                     {"title": title})
        result = found if k % 2 == 0 else env.open_page(title)
        call = {"id": f"call_{client}_{episode}_{k}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arg)}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": result[:1200]}]
        k += 1
    return messages


async def agent(client, cid: int, args, tokenizer, tools, rng: random.Random) -> list[tuple]:
    """One agent client: ``--episodes`` episodes of ``--turns`` turns; (latency, completion
    tokens, prompt tokens) of each request."""
    from coaflow.envs.environments import KBQAEnv

    env, out = KBQAEnv(), []
    for e in range(args.episodes):
        messages = episode_start(cid, e, args.context, tokenizer, tools)
        for t in range(args.turns):
            start = time.perf_counter()
            r = await client.chat.completions.create(
                model="bench", messages=messages, tools=tools, temperature=0,
                max_tokens=rng.randint(*args.turn_tokens), extra_body={"ignore_eos": True})
            out.append((time.perf_counter() - start, r.usage.completion_tokens,
                        r.usage.prompt_tokens))
            msg = r.choices[0].message
            calls = [c.model_dump() for c in msg.tool_calls or []]
            messages.append({"role": "assistant", "content": msg.content,
                             **({"tool_calls": calls} if calls else {})})
            result = env.search(f"{messages[1]['content'].split()[-1]} {t}")[:600]
            if calls:
                messages += [{"role": "tool", "tool_call_id": c["id"], "content": result}
                             for c in calls]
            else:
                messages.append({"role": "user", "content": f"Search result: {result}"})
    return out


async def prober(client, stop: asyncio.Event, latencies: list[float], every_s: float = 2.0):
    """A short request every ~``every_s`` seconds until ``stop``."""
    rng = random.Random(7)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s * rng.uniform(0.5, 1.5))
        except TimeoutError:
            pass
        if stop.is_set():
            return
        start = time.perf_counter()
        await client.chat.completions.create(model="bench", **SHORT)
        latencies.append(time.perf_counter() - start)


async def agent_phase(url: str, clients: int, first: int, args, tokenizer, tools) -> dict:
    """``clients`` agents at once, numbered from ``first`` (each phase its own episodes: none
    starts with a context an earlier phase left in the prefix cache)."""
    from openai import AsyncOpenAI

    before = metrics(url)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=3600) as client:
        stop, short = asyncio.Event(), []
        probe = asyncio.create_task(prober(client, stop, short))
        start = time.perf_counter()
        done = await asyncio.gather(*(agent(client, first + c, args, tokenizer, tools,
                                            random.Random(first + c))
                                      for c in range(clients)))
        wall = time.perf_counter() - start
        stop.set()
        await probe
    after = metrics(url)
    rows = [x for c in done for x in c]
    lat = [x[0] for x in rows]
    tokens = sum(x[1] for x in rows)
    return {"clients": clients, "requests": len(rows), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(lat), "p95_s": pct(lat, .95),
            "prompt_tokens": statistics.mean(x[2] for x in rows), "short": short,
            **delta(before, after)}


def delta(before: dict, after: dict) -> dict:
    """Decode steps, mean rows per step and seconds per step over a phase (new servers only)."""
    def d(name):
        return after[name] - before[name] if name in after and name in before else None

    steps, rows, secs = (d("coaflow_decode_steps_total"), d("coaflow_decode_rows_total"),
                         d("coaflow_decode_seconds_total"))
    chunks, prefill_s = d("coaflow_prefill_chunks_total"), d("coaflow_prefill_seconds_total")
    return {"steps": steps, "batch": rows / steps if steps and rows is not None else None,
            "step_s": secs / steps if steps and secs is not None else None,
            "decode_s": secs, "prefill_s": prefill_s,
            "chunk_s": prefill_s / chunks if chunks and prefill_s is not None else None,
            "prefill_tokens": d("coaflow_prefill_tokens_total"),
            "reused_tokens": d("coaflow_prefix_cache_tokens_total")}


async def short_alone(url: str, n: int = 5) -> float:
    """The short request on the idle server: its prefill plus 4 decode steps (median of n)."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            await client.chat.completions.create(model="bench", **SHORT)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_agent(url: str, args) -> None:
    from transformers import AutoTokenizer

    from coaflow.envs import tool_schemas

    tools = tool_schemas("kbqa")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    alone = asyncio.run(short_alone(url))
    counts = [1] + [int(c) for c in args.clients.split(",")]
    load = [os.getloadavg()[0]]
    rows = []
    for i, c in enumerate(counts):
        rows.append(asyncio.run(agent_phase(url, c, sum(counts[:i]), args, tokenizer, tools)))
        load.append(os.getloadavg()[0])

    def f(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"\nmodel {args.model}; agent load: {args.episodes} episode(s) x {args.turns} turns per "
          f"client, context ~{args.context} tokens growing each turn, kbqa tools, "
          f"{args.turn_tokens[0]}-{args.turn_tokens[1]} tokens a turn (ignore_eos, greedy); "
          f"server threads {args.threads}; load (1-min) {' -> '.join(f'{x:.1f}' for x in load)}")
    print(f"{'clients':>7} {'reqs':>5} {'prompt':>6} {'tokens':>6} {'wall s':>7} {'tok/s':>6} "
          f"{'ratio':>6} {'p50 s':>6} {'p95 s':>6} {'batch':>5} {'step s':>6} {'encoded':>7} "
          f"{'reused':>7} {'prefill s':>9} {'decode s':>8} {'short p50':>9} {'short p95':>9}")
    for r in rows:
        short = r["short"]
        print(f"{r['clients']:>7} {r['requests']:>5} {r['prompt_tokens']:>6.0f} {r['tokens']:>6} "
              f"{r['wall_s']:>7.1f} {r['tokens_per_s']:>6.2f} "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:>5.2f}x {r['p50_s']:>6.1f} "
              f"{r['p95_s']:>6.1f} {f(r['batch'], '5.2f'):>5} {f(r['step_s'], '6.3f'):>6} "
              f"{f(r['prefill_tokens'], '7.0f'):>7} {f(r['reused_tokens'], '7.0f'):>7} "
              f"{f(r['prefill_s'], '9.1f'):>9} {f(r['decode_s'], '8.1f'):>8} "
              f"{f(statistics.median(short) if short else None, '9.2f'):>9} "
              f"{f(pct(short, .95) if short else None, '9.2f'):>9}")
    many = rows[-1]
    print(f"tokens/s ratio {many['clients']}:1 = "
          f"{many['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x (target >= 5x)")
    step, chunk = many["step_s"] or 0.0, many["chunk_s"] or 0.0
    print(f"short request alone (its prefill + 4 steps) {alone:.2f}s; under {many['clients']} "
          f"clients p95 {pct(many['short'], .95):.2f}s; target <= alone + one decode step "
          f"({step:.2f}s) + one prefill chunk of another request ({chunk:.2f}s) = "
          f"{alone + step + chunk:.2f}s")


# --- greedy clients -------------------------------------------------------------------------

def run_greedy(url: str, args) -> None:
    import threading

    import httpx

    out = []
    for label, body in (("one client streams 3,900 tokens",
                         {"max_tokens": 3900, "stream": True}),
                        ("one client asks n=16 of 3,800 tokens",
                         {"max_tokens": 3800, "n": 16, "stream": True})):
        started, leave = threading.Event(), threading.Event()

        def greedy(body=body, started=started, leave=leave):
            req = {"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                   "ignore_eos": True, "temperature": 0, **body}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=req,
                              timeout=3600) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i >= 8:
                        started.set()
                    if leave.is_set():
                        return  # closing the stream: the client goes away

        t = threading.Thread(target=greedy, daemon=True)
        t.start()
        started.wait(timeout=1800)
        lat = []
        for _ in range(args.probes):
            start = time.perf_counter()
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": "bench", **SHORT},
                           timeout=3600)
            r.raise_for_status()
            lat.append(time.perf_counter() - start)
        leave.set()
        t.join(timeout=120)
        out.append((label, lat))
        time.sleep(2)  # the server drops the greedy client's rows
    alone = asyncio.run(short_alone(url))
    print(f"\nmodel {args.model}; server threads {args.threads}; load "
          f"{os.getloadavg()[0]:.1f}; short request alone {alone:.2f}s")
    for label, lat in out:
        print(f"short request while {label}: p50 {statistics.median(lat):.2f}s, p95 "
              f"{pct(lat, .95):.2f}s, max {max(lat):.2f}s ({len(lat)} in a row)")


# --- short questions ------------------------------------------------------------------------

async def one_client(client, questions, tools, max_tokens) -> list[tuple[float, int]]:
    out = []
    for q in questions:
        t = time.perf_counter()
        r = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": q}], tools=tools,
            max_tokens=max_tokens, temperature=0)
        out.append((time.perf_counter() - t, r.usage.completion_tokens))
    return out


async def short_phase(url: str, clients: int, questions, tools, max_tokens) -> dict:
    from openai import AsyncOpenAI

    before = metrics(url)
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=600) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(one_client(client, questions, tools, max_tokens)
                                      for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = [x for c in done for x, _ in c]
    tokens = sum(n for c in done for _, n in c)
    return {"clients": clients, "requests": len(lat), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(lat),
            "p95_s": pct(lat, .95), **delta(before, metrics(url))}


def run_short(url: str, args) -> None:
    from coaflow.envs import make_tasks, tool_schemas

    questions = [t.question for t in make_tasks("kbqa", "test", args.requests)]
    tools = tool_schemas("kbqa")
    asyncio.run(short_phase(url, 1, questions[:1], tools, 8))  # warm-up
    many = int(args.clients.split(",")[-1])
    rows = [asyncio.run(short_phase(url, c, questions, tools, args.max_tokens))
            for c in (1, many)]
    print(f"\nmodel {args.model}, {args.requests} requests per client, max_tokens "
          f"{args.max_tokens}, greedy, kbqa test questions with tools; load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'clients':>8} {'requests':>9} {'tokens':>8} {'wall s':>8} {'tokens/s':>9} "
          f"{'p50 s':>7} {'p95 s':>7} {'batch':>6}")
    for r in rows:
        batch = f"{r['batch']:.1f}" if r["batch"] is not None else "-"
        print(f"{r['clients']:>8} {r['requests']:>9} {r['tokens']:>8} {r['wall_s']:>8.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {batch:>6}")
    print(f"tokens/s ratio {many}:1 = {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="student", help="student, tiny, a model folder or "
                    "models:/NAME@ALIAS")
    ap.add_argument("--load", choices=["agent", "greedy", "short"], default="agent")
    ap.add_argument("--workdir", default="work", help="workdir of the registry")
    ap.add_argument("--clients", default="8", help="concurrent clients after the one-client "
                    "phase; a comma list runs a phase for each (agent: 2,4,8 gives the curve)")
    ap.add_argument("--episodes", type=int, default=1, help="agent: episodes per client")
    ap.add_argument("--turns", type=int, default=3, help="agent: turns per episode")
    ap.add_argument("--context", type=int, default=1000, help="agent: tokens of context at "
                    "an episode's first turn")
    ap.add_argument("--turn-tokens", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"),
                    help="agent: tokens generated a turn (uniform)")
    ap.add_argument("--probes", type=int, default=10, help="greedy: short requests per case")
    ap.add_argument("--requests", type=int, default=8, help="short: requests per client")
    ap.add_argument("--max-tokens", type=int, default=128, help="short: max_tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the coaflow source to serve")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `coaflow serve` "
                    "argument (repeatable), e.g. --serve-arg=--max-batch=32")
    args = ap.parse_args()

    import httpx

    tmp = tempfile.TemporaryDirectory()
    if args.model == "tiny":
        args.model_dir = str(tiny_model(Path(tmp.name) / "tiny"))
    elif args.model == "student":
        from coaflow.models.sources import resolve

        args.model_dir = str(resolve("smollm2-135m-instruct"))
    else:
        args.model_dir = args.model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": f"{args.src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "coaflow.cli", "serve", args.model_dir,
                             "--port", str(port), "--engine", "transformers", "--name", "bench",
                             "--workdir", args.workdir, "--max-batch",
                             str(max([16] + [int(c) for c in args.clients.split(",")])),
                             "--threads", str(args.threads), *args.serve_arg], env=env)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                sys.exit(f"the server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not become healthy in 600 s")
            time.sleep(0.5)
        print(f"serving {args.model_dir} from {args.src}", flush=True)
        {"agent": run_agent, "greedy": run_greedy, "short": run_short}[args.load](url, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        tmp.cleanup()


if __name__ == "__main__":
    main()
