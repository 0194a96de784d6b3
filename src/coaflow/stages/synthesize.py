"""synthesize: a teacher team solves tasks with real tools; its runs become chain-of-agents trajectories.

\b
    coaflow synthesize                                   # pipeline stage, default profile
    coaflow synthesize --teacher scripted --suite calc -n 20 --output /tmp/calc
    coaflow synthesize --teacher llm --set synthesize.llm.base_url=http://host:8000/v1 \\
        --set synthesize.llm.model=Qwen/Qwen3-32B -n 100 --output data/

Writes ``trajectories/`` (JSONL shards of coaflow trajectories: distilled, one model acting as the
whole team), ``raw/`` (the multi-agent log of each, for provenance) and ``failed/`` (tasks whose
attempt failed, with the reason). Resumable: a rerun after a crash skips tasks already written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from coaflow.contract import Context, PipelineError, Result
from coaflow.section import Section
from coaflow.teachers.llm import LlmTeacherConfig
from coaflow.tracking import redact, secret_values

NAME = "synthesize"
NEEDS: tuple[str, ...] = ()
RESUMABLE = True
PATH_FIELDS = ("task_files",)  # local files/folders: their contents are in the cache key


class Config(Section):
    teacher: Literal["scripted", "llm"] = Field("scripted", description="scripted: offline team; "
                                                "llm: the same roles on an OpenAI-compatible API")
    suites: dict[str, int] = Field({"kbqa": 1000, "calc": 200},
                                   description="tasks per built-in suite")
    split: Literal["train", "rl"] = Field("train", description="task split to solve: train "
                                          "(SFT data) or rl; never test, which only evaluate reads")
    task_files: list[str] = Field([], description="extra task files, solved with the llm "
                                  "teacher: JSONL lines {\"question\": str, \"answer\": str or "
                                  "[str], \"id\"?, \"difficulty\"?} or AFM RL parquet; the file's "
                                  "name is its suite (kbqa.jsonl: kbqa's tools and verifier)")
    mistake_rate: float = Field(0.3, ge=0, le=1, description="scripted: share of tasks with one "
                                "realistic mistake (caught by the critic/verifier)")
    unrecovered_rate: float = Field(0.08, ge=0, le=1, description="scripted: share of tasks whose "
                                    "mistake slips through (wrong answer)")
    terse: bool = Field(False, description="scripted: the same team, calls and answers without "
                        "the restatements (no thought before a call, no glosses in the plan, no "
                        "verifier's summary or second computation): about half the assistant "
                        "tokens (teachers.scripted)")
    shard_size: int = Field(100, ge=1, description="trajectories per shard (resume granularity)")
    workers: int = Field(4, ge=1, description="scripted: tasks solved at once in threads (calc's "
                         "sandboxed python calls wait on process start-up); output order and "
                         "content do not depend on it")
    llm: LlmTeacherConfig = Field(default_factory=LlmTeacherConfig)
    shards: int = Field(1, ge=1, description="workers the engines fan synthesize out to (KFP "
                        "ParallelFor, Airflow task mapping), each solving a contiguous slice of "
                        "the task list; the gate reads them all. coaflow run solves every task "
                        "in one process (its threads) whatever this says")
    shard: int | None = Field(None, ge=0, description="set by the engines, not in a profile: "
                              "solve only slice `shard` of `shards` (null: every task)")

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, v: dict[str, int]) -> dict[str, int]:
        from coaflow.envs import check_suite_counts

        return check_suite_counts(v)

    @model_validator(mode="after")
    def _shard_in_range(self):
        if self.shard is not None and self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards}: a shard index is 0 to "
                             f"shards - 1")
        return self


def shard_slice(n_tasks: int, shard: int, shards: int) -> slice:
    """The tasks of shard ``shard`` of ``shards``: a contiguous slice of the one task list, so
    the shards in order are the single run's tasks in order (the gate keeps the first of two
    duplicates: the same order gives the same accepted set).

    >>> [shard_slice(10, i, 3) for i in range(3)]
    [slice(0, 3, None), slice(3, 6, None), slice(6, 10, None)]
    """
    return slice(n_tasks * shard // shards, n_tasks * (shard + 1) // shards)


def load_tasks(cfg: Config, seed: int):
    from coaflow.envs import make_tasks
    from coaflow.envs.external import load_tasks as load_file

    tasks = []
    for suite, n in cfg.suites.items():
        try:
            tasks += make_tasks(suite, cfg.split, n, seed=seed) if n > 0 else []
        except ValueError as e:  # more distinct questions than the suite can draw
            raise PipelineError(f"synthesize.suites.{suite}={n}: {e}") from None
    for path in cfg.task_files:
        tasks += _file_tasks(cfg, path, load_file)
    return tasks


def _file_tasks(cfg: Config, path: str, load_file) -> list:
    """The tasks of one task file, checked here so that a wrong file is one line naming it, not
    a traceback in a teacher: the file's name is the suite whose tools and verifier solve it
    (``kbqa.jsonl``), and only the llm teacher solves tasks it did not generate itself."""
    from coaflow.envs import SUITES

    suite = Path(path).name.split(".")[0]
    if suite not in SUITES:
        raise PipelineError(f"synthesize.task_files: {path}: the file's name is its suite and "
                            f"{suite!r} is not one (suites: {', '.join(SUITES)}); rename it, "
                            f"e.g. {'kbqa' + ''.join(Path(path).suffixes)}")
    if cfg.teacher != "llm":
        raise PipelineError(f"synthesize.task_files: {path}: file tasks are solved by the llm "
                            "teacher (the scripted one only solves the tasks it generates); "
                            "set synthesize.teacher=llm")
    return load_file(path)


def _resume_point(folder: Path) -> tuple[set[str], int]:
    """Task ids in the finished shards of ``folder`` and the index of the next shard. A shard
    still named ``.tmp`` was cut off by a crash: it is deleted and its tasks are solved again."""
    from coaflow.schema import iter_records

    if not folder.exists():
        return set(), 0
    for tmp in folder.glob("*.tmp"):
        tmp.unlink()
    done = {rec["task_id"] if "task_id" in rec else rec["task"]["task_id"]
            for _, _, rec in iter_records(folder, None)}
    return done, len(list(folder.glob("*.jsonl")))


def _approx_tokens(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def synthesize(cfg: Config, out: Path, seed: int, cache_dir: Path | None = None, tracker=None,
               progress: bool = True) -> Result:
    """Solve every task not yet written under ``out``; the core of both the stage and the CLI."""
    from tqdm import tqdm

    from coaflow.teachers import llm

    if cfg.unrecovered_rate > cfg.mistake_rate:
        raise PipelineError("synthesize.unrecovered_rate must not exceed synthesize.mistake_rate")
    tasks, shard = _tasks(cfg, seed)
    record = _Record(cfg, out, seed)
    todo = [t for t in tasks if t.task_id not in record.done]
    client = None
    if cfg.teacher == "llm" and todo:
        client = llm.client_for(cfg.llm, cache_dir if cfg.llm.cache else None)
        client.check_endpoint()  # before any work
        record.client = client
    record.open()
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"synthesize "
               f"({cfg.teacher})", unit="task", disable=not progress, mininterval=1.0)
    t0 = time.perf_counter()
    try:
        if cfg.teacher == "scripted":
            _run_scripted(cfg, todo, seed, record, bar)
        else:
            asyncio.run(_run_llm(cfg, todo, client, record, bar))
    finally:
        bar.close()
        record.close()
    result = summarize(record.traj_dir, record.fail_dir, len(todo), time.perf_counter() - t0,
                       client, tracker)
    if shard is not None:
        result.summary["shard"] = shard  # how the gate orders and checks the shards it reads
    return result


def _tasks(cfg: Config, seed: int) -> tuple[list, dict | None]:
    """The tasks this run solves, and for a shard its place (``{"index", "of", "tasks"}``)."""
    tasks = load_tasks(cfg, seed)
    if not tasks:
        raise PipelineError("synthesize: no tasks (synthesize.suites and task_files are empty)")
    if cfg.shard is None:
        return tasks, None
    # the whole list is generated (cheap, by seed), then sliced. ``run`` names the run the
    # shard belongs to (its config but the index, and the seed): the gate refuses a mix
    run = json.dumps({**cfg.model_dump(mode="json", exclude={"shard"}), "seed": seed},
                     sort_keys=True)
    shard = {"index": cfg.shard, "of": cfg.shards, "tasks": len(tasks),
             "run": hashlib.sha256(run.encode()).hexdigest()[:16]}
    tasks = tasks[shard_slice(len(tasks), cfg.shard, cfg.shards)]
    if not tasks:
        raise PipelineError(f"synthesize: shard {cfg.shard} of {cfg.shards} has no tasks "
                            f"({shard['tasks']} in all): use fewer shards")
    return tasks, shard


class _Record:
    """Where solved tasks go: trajectories, the raw team logs and the failures, each in shards
    that continue after the last one a killed attempt wrote (``done``: the tasks it finished)."""

    def __init__(self, cfg: Config, out: Path, seed: int):
        from coaflow.schema import Provenance

        self.cfg, self.seed, self.client = cfg, seed, None
        self.traj_dir, self.fail_dir, raw_dir = out / "trajectories", out / "failed", out / "raw"
        (written, traj_next), (failed, fail_next) = (_resume_point(self.traj_dir),
                                                     _resume_point(self.fail_dir))
        self.done = written | failed
        self._writers = {"trajs": (self.traj_dir, "part", traj_next),
                         "raws": (raw_dir, "raw", _resume_point(raw_dir)[1]),
                         "fails": (self.fail_dir, "failed", fail_next)}
        self.trajs = self.raws = self.fails = None
        from coaflow.teachers.scripted import team_name

        self.provenance = Provenance(
            teacher=cfg.teacher, seed=seed, model=cfg.llm.model if cfg.teacher == "llm"
            else team_name(cfg.terse),
            tool_versions={"coaflow": __import__("coaflow").__version__})
        self.secrets = secret_values(cfg.llm.api_key_env)

    def open(self) -> None:
        """Make the shard writers: only once the teacher is known to answer (a bad endpoint
        leaves no folder behind)."""
        from coaflow.schema import ShardWriter

        for attr, (folder, prefix, start) in self._writers.items():
            setattr(self, attr, ShardWriter(folder, prefix, self.cfg.shard_size,
                                            start_index=start))

    def start(self, task):
        """The task's team log (``teachers.log.team_log``: a fresh environment per task)."""
        from coaflow.teachers.log import team_log

        return team_log(task, self.seed)

    def finish(self, task, log, answer, error: str | None, started) -> None:
        from coaflow.envs.rewards import score
        from coaflow.schema import Outcome
        from coaflow.teachers.log import distill

        if error is not None:
            self.fails.write(redact({"task_id": task.task_id, "suite": task.suite, "reason": error,
                                     "log": log.to_json()}, self.secrets))  # an endpoint may
            return                                                          # echo the key
        reward = score(task.suite, answer, task.answer)
        recovered = any(ev["type"] == "note" and ev.get("caught") for ev in log.events)
        outcome = Outcome(final_answer=answer, reward=reward, correct=reward == 1.0,
                          recovered=recovered and reward == 1.0)
        traj = distill(log, f"{task.task_id}-{self.cfg.teacher}", answer,
                       self.provenance.model_copy(update={"started_at": started}), outcome)
        if self.client is not None:
            traj.details["teacher_usage"] = dict(self.client.usage)
        self.trajs.write(traj)
        self.raws.write(log.to_json())

    def close(self) -> None:
        for w in (self.trajs, self.raws, self.fails):
            if w is not None:
                w.close()


def _run_scripted(cfg: Config, todo: list, seed: int, record: _Record, bar) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from coaflow.schema.trajectory import utcnow
    from coaflow.teachers import scripted

    mistakes = scripted.Mistakes(cfg.mistake_rate, cfg.unrecovered_rate)

    def solve(task):
        log, started = record.start(task), utcnow()
        rng = random.Random(f"{seed}-{task.task_id}")
        try:
            return log, scripted.solve(task, log, rng, mistakes, cfg.terse), None, started
        except ValueError as e:
            return log, None, str(e), started

    pool = ThreadPoolExecutor(cfg.workers)
    try:  # map keeps the task order
        for task, (log, answer, error, started) in zip(todo, pool.map(solve, todo), strict=True):
            record.finish(task, log, answer, error, started)
            bar.update()
    finally:  # stopped (SIGTERM, Ctrl-C, an error): drop the queued tasks, not solve them
        pool.shutdown(wait=True, cancel_futures=True)


async def _run_llm(cfg, todo, client, record: _Record, bar):
    from coaflow.envs import tool_schemas
    from coaflow.schema.trajectory import utcnow
    from coaflow.teachers import llm

    sem = asyncio.Semaphore(cfg.llm.concurrency)

    async def one(task):
        async with sem:
            log, started = record.start(task), utcnow()
            try:
                answer = await llm.solve(task, log, client, tool_schemas(task.suite),
                                         cfg.llm.max_turns)
                return task, log, answer, None, started
            except llm.MalformedResponse as e:
                return task, log, None, f"malformed teacher response: {e}", started

    async with client:
        for fut in asyncio.as_completed([one(t) for t in todo]):
            record.finish(*(await fut))  # one writer: results are written as they complete
            bar.update()


def summarize(traj_dir: Path, fail_dir: Path, solved_now: int, elapsed: float, client,
              tracker) -> Result:
    from coaflow.schema import iter_records, read_trajectories, to_text

    trajs = list(read_trajectories(traj_dir)) if traj_dir.exists() else []
    failed = Counter(r["reason"].split(":")[0] for _, _, r in iter_records(fail_dir, None)) \
        if fail_dir.exists() else Counter()
    n = len(trajs)
    if n == 0:
        raise PipelineError(f"synthesize wrote no trajectories ({sum(failed.values())} failed "
                            f"attempts, see {fail_dir})")
    correct = sum(bool(t.outcome.correct) for t in trajs)
    calls = sum(len(t.tool_calls()) for t in trajs)
    tokens = sum(_approx_tokens(to_text(t)) for t in trajs)
    by_suite = Counter(t.task.suite for t in trajs)
    by_difficulty = Counter(f"{t.task.suite}/{t.task.difficulty}" for t in trajs)
    metrics = {"trajectories": n, "failed_attempts": sum(failed.values()),
               "teacher_success_rate": round(correct / (n + sum(failed.values())), 4),
               "recovered": sum(t.outcome.recovered for t in trajs),
               "tool_calls_per_trajectory": round(calls / n, 2),
               "approx_tokens_per_trajectory": round(tokens / n, 1),
               "solved_now": solved_now,
               "trajectories_per_second": round(solved_now / elapsed, 2) if elapsed else 0.0,
               **{f"suite.{k}": v for k, v in by_suite.items()}}
    if client is not None:
        metrics.update({f"teacher_{k}": v for k, v in client.usage.items()})
    if tracker is not None:
        tracker.log_dataset([{"id": t.id, "suite": t.task.suite, "task_id": t.task.task_id,
                              "difficulty": t.task.difficulty, "correct": t.outcome.correct,
                              "tool_calls": len(t.tool_calls())} for t in trajs],
                            name="synthesize/trajectories", source=str(traj_dir),
                            context="synthesized")
        for t in trajs[:1]:
            tracker.log_text(to_text(t), "sample_trajectory.txt")
    return Result(data="trajectories",
                  outputs={"trajectories": str(traj_dir), "raw": str(traj_dir.parent / "raw"),
                           "failed": str(fail_dir)},
                  metrics=metrics,
                  summary={"by_suite": dict(by_suite), "by_difficulty": dict(by_difficulty),
                           "failed_by_reason": dict(failed)})


def run(cfg: Config, ctx: Context) -> Result:
    cache = Path(ctx.run.workdir) / "cache" / "llm"
    return synthesize(cfg, ctx.out, ctx.run.seed, cache, ctx.tracker)
