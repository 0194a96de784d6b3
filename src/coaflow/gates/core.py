"""The gate, end to end: one function shared by the pipeline stage and ``coaflow gate --input``.

    report = gate("runs/X/synthesize/trajectories", "out/", cfg)

Streams every line of every shard once (nothing but the per-trajectory table is held in memory),
runs the structural validators and content filters on each trajectory, writes accepted ones to
``<out>/accepted.partial/`` and rejected ones (and unreadable lines) to ``<out>/quarantine.jsonl``,
then runs the Great Expectations suite over the table. Only when every expectation passes does
``accepted.partial`` become ``accepted``: a failed batch never leaves output that looks good.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coaflow.errors import GateRefused, PipelineError
from coaflow.gates import filters, validators
from coaflow.gates.expectations import quiet_gx
from coaflow.schema.io import (
    SHARD_SUFFIXES,
    BadRecord,
    iter_records,
    shard_files,
    trajectory_source,
    validation_field,
)
from coaflow.schema.trajectory import (
    ApiAction,
    CodeAction,
    MessageAction,
    TextObservation,
    Trajectory,
)


class GateError(PipelineError):
    """Nothing to gate, or a bad gate setting (tokenizer, test file); the message says why."""


class GateRefusedError(GateRefused, GateError):
    """The batch failed the gate's expectations (exit code 3); quarantine and Data Docs exist."""


def _read_reason(message: str) -> str:
    """Quarantine code of a line ``iter_records`` could not read."""
    if message.startswith("invalid UTF-8"):
        return "invalid_utf8"
    if message.startswith("invalid JSON"):
        return "invalid_json"
    if message.startswith("record larger than"):  # past io.MAX_RECORD_BYTES: never parsed
        return "too_long"
    return "unreadable"


def _parse(raw: Any) -> tuple[Trajectory | None, list[tuple[str, str]]]:
    """A raw JSON value -> Trajectory, or the schema problem (tool-link errors have their own
    code: they come from the model validator, at the record's root)."""
    if not isinstance(raw, dict):
        return None, [("schema", f"(record): expected a JSON object, got {type(raw).__name__}")]
    try:
        return Trajectory.model_validate(raw), []
    except ValidationError as e:
        first = e.errors()[0]
        field, msg = validation_field(e)
        if not first["loc"] and first["type"] == "value_error":
            return None, [("tool_link", msg.removeprefix("Value error, "))]
        return None, [("schema", f"{field}: {msg}")]


def shape(traj: Trajectory) -> tuple[int, int]:
    """(assistant turns as ``to_messages`` renders them, tool calls)."""
    turns = calls = 0
    in_turn = has_calls = False
    for step in traj.content:
        if isinstance(step, TextObservation):
            in_turn = False
            continue
        is_call = isinstance(step, (ApiAction, CodeAction))
        if not in_turn or (has_calls and not is_call):
            turns += 1
            in_turn, has_calls = True, False
        if is_call:
            calls += 1
            has_calls = True
    return turns, calls


class _Suites:
    """Per-suite lookups, computed once per suite: tool schemas and the test-split index."""

    def __init__(self, cfg, seed: int, log):
        self.cfg, self.seed, self.log = cfg, seed, log
        self.tools: dict[str, dict | None] = {}
        self.schemas: dict[str, list | None] = {}
        self.decon: dict[str, filters.Decontaminator | None] = {}
        self.file_decon = None
        if cfg.decontam_file:
            try:
                qs = filters.load_test_questions(cfg.decontam_file)
            except ValueError as e:  # DataError too: the file is the user's
                raise GateError(f"gate.decontam_file: {e}") from None
            self.file_decon = filters.Decontaminator(qs, cfg.decontam_ngram,
                                                     cfg.decontam_threshold)

    def schema(self, suite: str) -> list | None:
        if suite not in self.schemas:
            try:
                from coaflow.envs import tool_schemas

                self.schemas[suite] = tool_schemas(suite)
            except (ImportError, KeyError, ValueError) as e:
                self.log(f"[gate] no tool schemas for suite {suite!r} ({e}); checking tool "
                         "names against available_apis only")
                self.schemas[suite] = None
            self.tools[suite] = validators.tool_index(self.schemas[suite])
        return self.schemas[suite]

    def decontaminator(self, suite: str) -> filters.Decontaminator | None:
        if suite not in self.decon:
            self.decon[suite] = None
            if self.cfg.decontam_test_tasks > 0:
                try:
                    from coaflow.envs import make_tasks

                    tasks = make_tasks(suite, "test", self.cfg.decontam_test_tasks, self.seed)
                    self.decon[suite] = filters.Decontaminator(
                        [t.question for t in tasks], self.cfg.decontam_ngram,
                        self.cfg.decontam_threshold)
                except (ImportError, KeyError, ValueError) as e:
                    self.log(f"[gate] no test split for suite {suite!r} ({e}); not decontaminated")
        return self.decon[suite]


def check(traj: Trajectory, cfg, suites: _Suites, count_tokens=None) -> tuple[list, dict]:
    """Every per-trajectory check except deduplication: (problems, table row fields)."""
    suite = traj.task.suite
    suites.schema(suite)
    answer = validators.answer_text(traj)
    chars = validators.text_chars(traj)
    tokens, problems = None, []
    if count_tokens is not None and chars <= cfg.max_chars:
        try:
            tokens = count_tokens(traj)
        except Exception as e:  # noqa: BLE001 - a chat template that cannot render this run
            problems.append(("unrenderable", f"chat template: {type(e).__name__}: {e}"))
    problems += (validators.check_links(traj) + validators.check_tags(traj)
                + validators.check_answer(traj)
                + validators.check_tools(traj, suites.tools[suite])
                + validators.check_length(chars, tokens, cfg.max_chars, cfg.max_tokens)
                + filters.check_tool_use(traj, cfg.max_identical_calls))
    if cfg.allow_empty_observations:
        problems = [p for p in problems if p[0] != "empty_observation"]
    if answer is not None:
        problems += filters.check_correct(traj, answer, cfg.correctness)
    decon = suites.decontaminator(suite)
    contaminated = (decon.check(traj.task.question) if decon is not None else []) + \
        (suites.file_decon.check(traj.task.question) if suites.file_decon is not None else [])
    problems += contaminated[:1]
    turns, calls = shape(traj)
    row = {"id": traj.id, "suite": suite, "steps": len(traj.content), "turns": turns,
           "tool_calls": calls, "chars": chars, "tokens": tokens,
           "answer_present": int(answer is not None), "contaminated": int(bool(contaminated)),
           "recovered": int(traj.outcome.recovered),
           "agents": len({s.agent for s in traj.content if isinstance(s, MessageAction)})}
    return problems, row


def input_files(path: str | Path) -> tuple[list[Path], list[str]]:
    """(shards to read, other files found and ignored) under a file or folder."""
    path = trajectory_source(path)
    files = shard_files(path)
    skipped = []
    if path.is_dir():
        skipped = sorted(str(p) for p in path.rglob("*") if p.is_file()
                         and not p.name.endswith(SHARD_SUFFIXES))
    return files, skipped


class Checker:
    """Everything one process needs to check records: the gate config, the suites' answers,
    the token counter and the MinHash permutations (built once per process)."""

    def __init__(self, cfg, seed: int, log=None):
        self.cfg, self.seed = cfg, seed
        self.suites = _Suites(cfg, seed, log or (lambda *a: None))
        self.count_tokens = (validators.token_counter(cfg.tokenizer, self.suites.schema)
                             if cfg.tokenizer else None)
        self.perms = filters.permutations(cfg.minhash_perm) if cfg.dedup else None

    def process_file(self, file: str) -> tuple[list[dict], dict]:
        """Read, parse and check every line of one shard.

        Returns (items in line order, CPU seconds per phase). An item is ``{"source", "line",
        "id", "suite", "problems", "row"}`` plus, for a trajectory that passed every check, its
        JSON line and dedup keys (``digest``, ``sig``); deduplication itself happens in the
        caller, in order."""
        cfg = self.cfg
        items: list[dict] = []
        clean: list[tuple[dict, str]] = []  # (item, dedup text) of runs that passed every check
        timings: Counter = Counter()

        def on_bad(bad: BadRecord):
            items.append({"source": bad.path, "line": bad.line, "id": None, "suite": None,
                          "problems": [(_read_reason(bad.reason), bad.reason)], "row": None})

        t0 = time.perf_counter()
        for source, line, raw in iter_records(file, None, errors="skip", on_error=on_bad):
            traj, problems = _parse(raw)
            t1 = time.perf_counter()
            timings["read_parse"] += t1 - t0
            if traj is None:
                rid = raw.get("id") if isinstance(raw, dict) else None
                items.append({"source": source, "line": line, "id": rid if isinstance(rid, str)
                              else None, "suite": _raw_suite(raw), "problems": problems,
                              "row": None})
                t0 = time.perf_counter()
                continue
            problems, row = check(traj, cfg, self.suites, self.count_tokens)
            item = {"source": source, "line": line, "id": traj.id, "suite": traj.task.suite,
                    "problems": problems, "row": row}
            t2 = time.perf_counter()
            timings["validate_filter"] += t2 - t1
            if not problems:
                if cfg.dedup:
                    clean.append((item, filters.dedup_text(traj)))
                t3 = time.perf_counter()
                timings["dedup"] += t3 - t2
                item["json"] = traj.model_dump_json()
                t2 = time.perf_counter()
                timings["write"] += t2 - t3
            items.append(item)
            t0 = time.perf_counter()
        t0 = time.perf_counter()
        for i in range(0, len(clean), 512):  # batches: numpy does the shingles x permutations
            chunk = clean[i:i + 512]
            digests, sigs = filters.signatures([t for _, t in chunk], cfg.shingle, self.perms)
            for (item, _), digest, sig in zip(chunk, digests, sigs, strict=True):
                item["digest"], item["sig"] = digest, sig
        timings["dedup"] += time.perf_counter() - t0
        return items, dict(timings)


_worker: Checker | None = None  # the Checker of a spawned worker process (never the caller's)


def _worker_init(cfg, seed) -> None:
    global _worker
    quiet_gx()
    _worker = Checker(cfg, seed)


def _worker_process_file(file: str) -> tuple[list[dict], dict]:
    return _worker.process_file(file)


def _process_all(files: list[Path], checker: Checker):
    """Yield ``Checker.process_file`` results in file order, with ``cfg.workers`` processes
    (this one, with ``checker``, when 1)."""
    cfg = checker.cfg
    if cfg.workers <= 1 or len(files) <= 1:
        for f in files:
            yield checker.process_file(str(f))
        return
    import multiprocessing as mp

    # spawn, not fork: the caller may hold MLflow/sqlite threads and connections.
    with mp.get_context("spawn").Pool(min(cfg.workers, len(files)), _worker_init,
                                       (cfg, checker.seed)) as pool:
        yield from pool.imap(_worker_process_file, [str(f) for f in files])


class _LineShards:
    """Accepted JSON lines into ``<folder>/accepted-00000.jsonl``, ..., ``shard_size`` per file."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder, self.shard_size, self.n, self.fh = folder, shard_size, 0, None
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, line: str) -> None:
        if self.n % self.shard_size == 0:
            self.close()
            self.fh = open(self.folder / f"accepted-{self.n // self.shard_size:05d}.jsonl", "w",
                           encoding="utf-8")
        self.fh.write(line + "\n")
        self.n += 1

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def gate(input_path: str | Path | list, out_dir: str | Path, cfg, seed: int = 0,
         log=print) -> dict:
    """Gate every trajectory under ``input_path`` (a file or folder, or a list of them read in
    order: the shards of a fanned-out synthesize) into ``out_dir``; returns the report.

    Raises ``GateError`` when the input holds no records or an expectation fails (the report,
    the quarantine and the Data Docs are written first either way)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: Counter = Counter()
    t_start = time.perf_counter()
    files, skipped = [], []
    for path in input_path if isinstance(input_path, list | tuple) else [input_path]:
        more, other = input_files(path)
        files, skipped = files + more, skipped + other
    if cfg.expectations:  # GX takes seconds to import: do it while the records are checked
        threading.Thread(target=_import_gx, args=(timings,), daemon=True).start()
    try:  # here, not in the workers: a bad tokenizer or test file fails once, clearly
        checker = Checker(cfg, seed, log)
    except ValueError as e:
        raise GateError(str(e)) from None
    partial, quarantine = out / "accepted.partial", out / "quarantine.jsonl"
    rows, reasons = _sort(files, checker, partial, quarantine, timings)
    timings["python_total"] = time.perf_counter() - t_start
    if not rows:
        shutil.rmtree(partial, ignore_errors=True)
        where = f"{len(files)} shard file(s)" + (f"; ignored {len(skipped)} other file(s): "
                                                 f"{', '.join(skipped[:5])}" if skipped else "")
        raise GateError(f"gate: no trajectories in {input_path} ({where}): empty input, "
                        f"nothing to train on")
    frame = _frame(rows)
    report = _report(input_path, files, skipped, frame, reasons, quarantine)
    t_gx = time.perf_counter()
    gx_result = {"success": True, "results": [], "failed": [], "docs": None}
    if cfg.expectations:
        from coaflow.gates.expectations import run_suite

        gx_result = run_suite(frame, cfg, out / "data_docs" if cfg.data_docs else None)
    timings["great_expectations"] = time.perf_counter() - t_gx
    timings["total"] = time.perf_counter() - t_start
    report.update(expectations=gx_result["results"], data_docs=gx_result["docs"],
                  timings={k: round(v, 3) for k, v in timings.items()})
    (out / "gate_report.json").write_text(json.dumps(report, indent=2, default=str))
    _refuse_a_bad_batch(report, gx_result, cfg, input_path)
    os.replace(partial, out / "accepted")
    report["accepted_dir"] = str(out / "accepted")
    (out / "gate_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _sort(files: list[Path], checker: Checker, partial: Path, quarantine: Path,
          timings: Counter) -> tuple[list[dict], Counter]:
    """Every record into the accepted shards (``partial``) or the quarantine, in input order
    (duplicates decided here, first seen kept); returns (one row per record, reason counts).
    A crash half way leaves neither partial output nor a half-written quarantine."""
    cfg = checker.cfg
    deduper = filters.Deduper(cfg.near_duplicate_threshold, cfg.minhash_perm,
                              near=cfg.near_duplicates) if cfg.dedup else None
    for stale in (partial, partial.with_name("accepted")):
        shutil.rmtree(stale, ignore_errors=True)
    q_tmp = quarantine.with_name(quarantine.name + ".tmp")
    reasons: Counter = Counter()
    rows: list[dict] = []
    shards = _LineShards(partial, cfg.shard_size)
    try:
        with open(q_tmp, "w", encoding="utf-8") as qfh:
            for items, worker_times in _process_all(files, checker):
                timings.update(worker_times)
                t0 = time.perf_counter()
                for it in sorted(items, key=lambda x: x["line"]):
                    problems = it["problems"]
                    if not problems and deduper is not None:
                        problems = deduper.check(it["id"], it["digest"], it["sig"])
                    row = {**(it["row"] or {"id": it["id"], "suite": it["suite"]}),
                           "source": it["source"], "line": it["line"]}
                    if problems:
                        codes = list(dict.fromkeys(c for c, _ in problems))
                        reasons.update(codes)
                        qfh.write(json.dumps({
                            "source": it["source"], "line": it["line"], "id": it["id"],
                            "suite": it["suite"], "reasons": codes,
                            "details": [f"{c}: {d}" for c, d in problems]},
                            ensure_ascii=False) + "\n")
                        rows.append({**row, "accepted": 0, "reasons": ",".join(codes),
                                     "duplicate": int(codes[0] in ("duplicate", "near_duplicate"))})
                    else:
                        shards.write(it["json"])
                        rows.append({**row, "accepted": 1, "duplicate": 0, "reasons": ""})
                timings["merge_dedup_write"] += time.perf_counter() - t0
    except BaseException:
        shards.close()
        shutil.rmtree(partial, ignore_errors=True)
        q_tmp.unlink(missing_ok=True)
        raise
    shards.close()
    os.replace(q_tmp, quarantine)
    return rows, reasons


def _frame(rows: list[dict]):
    """The rows as the table the expectations read (numeric columns numeric)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for col in ("steps", "turns", "tool_calls", "chars", "answer_present"):
        frame[col] = pd.to_numeric(frame[col] if col in frame else None, errors="coerce")
    return frame


def _report(input_path, files: list[Path], skipped: list[str], frame, reasons: Counter,
            quarantine: Path) -> dict[str, Any]:
    n_in, n_acc = len(frame), int(frame["accepted"].sum())
    per_suite = {}
    for suite, g in frame[frame["suite"].notna()].groupby("suite"):
        per_suite[str(suite)] = {"in": len(g), "accepted": int(g["accepted"].sum()),
                                 "rejected": dict(Counter(r for rs in g["reasons"] for r in
                                                          rs.split(",") if r))}
    return {"input": [str(p) for p in input_path] if isinstance(input_path, list | tuple)
            else str(input_path), "files": [str(f) for f in files], "skipped_files": skipped,
            "in": n_in, "accepted": n_acc, "rejected": n_in - n_acc,
            "accepted_fraction": n_acc / n_in, "reasons": dict(reasons.most_common()),
            "suites": per_suite, "quarantine": str(quarantine)}


def _refuse_a_bad_batch(report: dict, gx_result: dict, cfg, input_path) -> None:
    """``GateRefusedError`` when an expectation failed or too few runs were accepted."""
    n_in, n_acc, quarantine = report["in"], report["accepted"], report["quarantine"]
    if not gx_result["success"]:
        from coaflow.gates.expectations import describe_failure

        lines = "\n  ".join(describe_failure(r) for r in gx_result["failed"])
        raise GateRefusedError(f"gate: {len(gx_result['failed'])} expectation(s) failed on "
                               f"{input_path} ({n_acc}/{n_in} accepted; quarantine {quarantine}; "
                               f"Data Docs {gx_result['docs']}):\n  {lines}")
    if n_acc / n_in < cfg.min_accepted_fraction:  # the gate's own rule, whatever is switched off
        raise GateRefusedError(f"gate: {n_acc}/{n_in} accepted ({n_acc / n_in:.1%}) on "
                               f"{input_path}, below gate.min_accepted_fraction "
                               f"{cfg.min_accepted_fraction:g} (quarantine {quarantine})")


def _import_gx(timings: Counter) -> None:
    quiet_gx()
    t = time.perf_counter()
    try:
        import great_expectations  # noqa: F401
    except Exception:  # noqa: BLE001 - run_suite imports it again and reports the error
        pass
    timings["gx_import_overlapped"] = time.perf_counter() - t


def _raw_suite(raw: Any) -> str | None:
    task = raw.get("task") if isinstance(raw, dict) else None
    suite = task.get("suite") if isinstance(task, dict) else None
    return suite if isinstance(suite, str) else None
