"""evaluate: how good each model really is, on the held-out test split, by whole episodes.

\b
    coaflow evaluate                                       # in a run, after sft (and rl)
    coaflow evaluate --model runs/r/sft/model --suite calc -n 50
    coaflow evaluate --model models:/coaflow-agent@champion
    coaflow evaluate --model http://127.0.0.1:8000/v1      # any OpenAI-compatible endpoint
    coaflow evaluate --model scripted                      # the scripted teacher (the ceiling)

The same tasks for every model: ``evaluate.suites`` tasks of each suite's ``test`` split
(``envs.make_tasks(suite, "test", n, run.seed)``; its questions are disjoint from the train and rl
splits by construction, and the gate checks synthesized data against them). Rows: ``base`` (the
untrained start, so learning shows), ``sft`` (the sft model, when rl made the candidate: what rl
changed), ``candidate`` (rl's model if rl ran, else sft's), ``champion``
(``models:/<run.name>-agent@champion`` when the registry has one) and ``teacher`` (the scripted
team, or any model spec: the ceiling). Every row runs through the one agent loop
(``coaflow.agent``), greedy, with the suites' real tools, the teacher's turns included
(``teachers.replay``).

The budget (turns per episode, tokens per turn) is per suite and the same for every row: by
default derived from the teacher runs sft trained on (``agent.budget``, sft's ``budget.json``:
the smallest that fits 99 % of them, plus a margin); an explicit ``max_turns`` / ``max_new_tokens``
that fits fewer than 95 % of those runs is refused unless ``tight_budget`` says it is meant. The
budget and the share of teacher runs it fits are in the summary, the table and the report card.

Per model and suite: success (pass@1) with its 95 % Wilson interval and as a share of the teacher's
(the ceiling in the same loop and budget), optional pass@k (sampled), the format-error rate, mean
turns / tool calls / tokens, how episodes ended (``agent.loop.CATEGORIES``: turn-token cuts by
turn, turn-count cuts and loops apart), sliced by difficulty and kbqa hop count. Candidate vs each
other row is a paired comparison on the same tasks: the difference in success with a paired
bootstrap interval and the exact McNemar p-value (the promotion gate reads it).

A row whose model, tasks, budget and code are unchanged comes from ``<workdir>/cache/evaluate``
(``row_cache``): the base row of an unchanged base model is computed once per workdir.

Outputs: ``outcomes.jsonl`` (one line per model x task), ``transcripts/`` (every episode as a
trajectory, ``<model>.jsonl``, and a readable sample), ``table.md`` / ``table.html``; all in MLflow
with the ``eval/<model>/<suite>/...`` metrics.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from coaflow.contract import Context, PipelineError, Result
from coaflow.report import EvalSummary, eval_html, eval_markdown
from coaflow.section import Section

NAME = "evaluate"
NEEDS = ("sft",)
OPTIONAL = ("rl",)
RESUMABLE = False
PATH_FIELDS = ("teacher",)  # local files/folders: their contents are in the cache key

ROWS = ("base", "sft", "candidate", "champion", "teacher")
markdown = eval_markdown  # the bench scripts' name for it (bench/paired_eval.py, study_rl.py)


class Config(Section):
    suites: dict[str, int] = Field({"kbqa": 60, "calc": 60}, description="test-split tasks per "
                                   "suite; the same tasks for every model")
    models: list[Literal["base", "sft", "candidate", "champion", "teacher"]] = Field(
        list(ROWS), description="rows of the table: sft only when rl ran (the candidate is then "
        "rl's model, and the sft row shows what rl changed); champion only when the registry "
        "has one")
    teacher: str = Field("scripted", description="the ceiling row: 'scripted' (the offline "
                         "team, no mistakes) or a model spec (folder, hub id, models:/, URL)")
    max_turns: int | dict[str, int] | None = Field(
        None, description="assistant turns per episode: one number, one per suite, or null: "
        "derived from the teacher runs sft trained on (agent.budget)")
    max_new_tokens: int | dict[str, int] | None = Field(
        None, description="tokens of one assistant turn: one number, one per suite, or null: "
        "derived from the teacher runs sft trained on")
    tight_budget: bool = Field(False, description="accept an explicit budget that fits fewer "
                               "than 95 % of the teacher's runs (judging within it on purpose)")
    row_cache: bool = Field(True, description="reuse a row whose model, tasks, budget and code "
                            "are unchanged (<workdir>/cache/evaluate)")
    batch_size: int = Field(16, ge=1, description="episodes generated together (transformers)")
    concurrency: int = Field(16, ge=1, description="episodes in flight (HTTP endpoints)")
    threads: int = Field(1, ge=0, description="torch CPU threads while generating in process; "
                         "0: torch's default (more helps big models, not tiny ones)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of in-process models: auto is bfloat16 on a GPU or a CPU with "
        "native bf16 kernels (AMX / AVX-512 BF16), else the model's own")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var with the key for "
                                    "endpoint models")
    pass_k: int = Field(0, ge=0, description="k of pass@k, from k sampled episodes per task; "
                        "0: off")
    temperature: float = Field(0.8, gt=0, description="sampling temperature for pass@k")
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples")
    transcripts: int = Field(2, ge=0, description="episodes per model and suite in the "
                             "readable transcript sample")

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, v: dict[str, int]) -> dict[str, int]:
        from coaflow.envs import check_suite_counts

        return check_suite_counts(v, least=1)  # every suite needs a test task


def champion_version(name: str, uri: str, candidate_key: str | None = None) -> int | None:
    """The version behind ``name@champion`` in the registry at ``uri``, or None (no registry,
    no such model, no such alias, or the champion is the candidate itself: the version that
    ``register`` made from the model with cache key ``candidate_key``). A sqlite store that does
    not exist is not created."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None
    from coaflow.registry import Registry

    champ = Registry(uri).champion(name)
    if champ is None or (candidate_key
                         and champ.tags.get("coaflow.candidate_key") == candidate_key):
        return None
    return champ.version


def cache_extras(cfg: Config, run, inputs: dict[str, str], registry_uri: str) -> dict:
    """A new champion changes the table: its version is part of the cache key (none when the
    champion is this very candidate: a rerun with nothing changed stays a cache hit)."""
    if "champion" not in cfg.models:
        return {}
    from coaflow.registry import model_name

    version = champion_version(model_name(run.name), registry_uri,
                               candidate_key=inputs.get("rl") or inputs.get("sft"))
    return {"champion": version}


def load_test_tasks(suites: dict[str, int], seed: int) -> list:
    from coaflow.envs import make_tasks

    return [t for s, n in suites.items() for t in make_tasks(s, "test", n, seed=seed)]


# --- running the models ---------------------------------------------------------------------

def budgets_for(cfg: Config, runs: dict) -> tuple[dict, dict]:
    """``(budgets, fit table)`` of ``cfg.suites`` from the teacher runs sft measured."""
    from coaflow.agent import budget

    try:
        return budget.resolve(list(cfg.suites), runs, max_turns=cfg.max_turns,
                              max_new_tokens=cfg.max_new_tokens, allow_tight=cfg.tight_budget)
    except ValueError as e:
        raise PipelineError(str(e)) from None


def run_model(spec: str, tasks: list, cfg: Config, *, budgets: dict, field: str,
              registry_uri: str | None, seed: int, tokenizer: str | None = None,
              terse: bool = False, cache: Path | None = None, samples: int = 1,
              temperature: float = 0.0) -> tuple[list, bool]:
    """``(trajectories, cached)``: every task through the agent loop with the model ``spec``
    (``scripted``: the scripted team's turns, ``terse`` or not, counted by the tokenizer of
    ``tokenizer``), each within its suite's budget; from ``cache`` (a folder) when this very row
    ran before."""
    import os

    from coaflow.agent import run_episodes
    from coaflow.agent.models import is_endpoint, make_backend, resolve_model
    from coaflow.models.loading import inference_dtype

    with tempfile.TemporaryDirectory() as download:
        local = spec if spec == "scripted" or is_endpoint(spec) else resolve_model(
            spec, registry_uri=registry_uri, download_dir=download)
        path = _row_path(cache, local, (tokenizer, terse), tasks, budgets, cfg, seed, samples,
                         temperature)
        if path is not None and path.is_file():
            from coaflow.schema import read_trajectories

            return list(read_trajectories(path)), True
        if spec == "scripted":
            backend = _teacher_backend(tasks, tokenizer, seed, terse, field)
        else:
            backend = make_backend(local, batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                                   api_key=os.environ.get(cfg.api_key_env or "") or None,
                                   dtype=inference_dtype(cfg.dtype), threads=cfg.threads or None,
                                   field=field)
        from tqdm import tqdm

        with tqdm(total=len(tasks) * samples, desc=field, unit="episode",
                  mininterval=2.0) as bar:
            trajs = run_episodes(backend, tasks, budgets=budgets, temperature=temperature,
                                 seed=seed, samples=samples, progress=bar.update)
    if path is not None:
        from coaflow.schema import write_jsonl

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        write_jsonl(tmp, trajs)
        tmp.replace(path)
    return trajs, False


def _teacher_backend(tasks: list, tokenizer: str | None, seed: int, terse: bool, field: str):
    from coaflow.models.loading import load_tokenizer
    from coaflow.teachers.replay import TeacherBackend

    if tokenizer is None:
        raise PipelineError(f"{field}: the scripted teacher's turns are counted in the "
                            "student's tokens, and there is no student tokenizer to count with")
    return TeacherBackend(tasks, load_tokenizer(tokenizer, field=field), seed, terse)


def _row_path(cache: Path | None, model: str, teacher: tuple, tasks: list,
              budgets: dict, cfg: Config, seed: int, samples: int, temperature: float
              ) -> Path | None:
    """Where this row's episodes are kept: a digest of everything they depend on (the model's
    files, or the scripted team and the tokenizer that counts its turns; the tasks; the budget;
    the decoding settings; coaflow's code). None for an endpoint (its model is not ours to
    digest) or without a cache."""
    from dataclasses import asdict

    from coaflow.agent.models import is_endpoint
    from coaflow.digest import code_digest, digest, path_digest

    if cache is None or is_endpoint(model):
        return None
    weights = ("scripted", _tokenizer_digest(teacher[0]), teacher[1]) if model == "scripted" \
        else path_digest(model)
    if weights is None:  # a hub id: its files are not here to digest
        return None
    key = digest({"model": weights, "tasks": [(t.suite, t.task_id, t.question) for t in tasks],
                  "budgets": {s: asdict(b) for s, b in sorted(budgets.items())},
                  "decoding": [cfg.batch_size, cfg.dtype, seed, samples, temperature],
                  "code": code_digest()})
    return cache / f"{key}.jsonl"


def _tokenizer_digest(folder: str | None):
    from coaflow.digest import path_digest

    if folder is None or not Path(folder).is_dir():
        return folder
    files = [str(p) for p in sorted(Path(folder).iterdir())
             if p.name.startswith(("tokenizer", "special_tokens", "chat_template"))]
    return path_digest(files)


# --- summarizing ------------------------------------------------------------------------------

def outcome_row(model: str, traj) -> dict:
    from coaflow.agent import category

    t, d = traj.task, traj.details
    hops = len(t.metadata.get("hops") or []) if t.suite == "kbqa" else None
    return {"model": model, "suite": t.suite, "task_id": t.task_id, "difficulty": t.difficulty,
            "hops": hops, "success": int(bool(traj.outcome.correct)), "category": category(traj),
            "turns": d["turns"], "tool_calls": d["tool_calls"], "tokens": d["tokens"],
            "format_errors": d["format_errors"], "cut_turn": d.get("cut_turn")}


def rate(rows: list[dict]) -> dict:
    """success with its Wilson interval over ``rows``."""
    from coaflow.stats import wilson

    n, k = len(rows), sum(r["success"] for r in rows)
    lo, hi = wilson(k, n)
    return {"success": k / n if n else 0.0, "lo": lo, "hi": hi, "n": n}


def describe(rows: list[dict]) -> dict:
    n = len(rows)
    return {**rate(rows),
            "format_error_rate": sum(r["format_errors"] > 0 for r in rows) / n,
            "mean_turns": sum(r["turns"] for r in rows) / n,
            "mean_tool_calls": sum(r["tool_calls"] for r in rows) / n,
            "mean_tokens": sum(r["tokens"] for r in rows) / n,
            "categories": dict(Counter(r["category"] for r in rows)),
            # where the token budget (or a loop) cut a turn short: which turn of the episode
            "cut_turns": dict(sorted(Counter(str(r["cut_turn"]) for r in rows
                                             if r.get("cut_turn")).items()))}


def slices(rows: list[dict]) -> dict:
    out: dict = {}
    for key in ("difficulty", "hops"):
        groups = defaultdict(list)
        for r in rows:
            if r[key] is not None:
                groups[str(r[key])].append(r)
        if groups:
            out[key] = {k: rate(v) for k, v in sorted(groups.items())}
    return out


def compare(a: list[dict], b: list[dict], resamples: int, seed: int) -> dict:
    """Paired comparison of two models' rows on the same tasks, per suite and over all."""
    from coaflow.stats import mcnemar_exact, paired_bootstrap

    by_b = {(r["suite"], r["task_id"]): r["success"] for r in b}
    out = {}
    for suite in [*sorted({r["suite"] for r in a}), "all"]:
        pairs = [(r["success"], by_b[(r["suite"], r["task_id"])]) for r in a
                 if suite in ("all", r["suite"]) and (r["suite"], r["task_id"]) in by_b]
        xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
        diff, lo, hi = paired_bootstrap(xs, ys, resamples=resamples, seed=seed)
        only_a = sum(x > y for x, y in pairs)
        only_b = sum(y > x for x, y in pairs)
        out[suite] = {"diff": diff, "lo": lo, "hi": hi, "p_value": mcnemar_exact(only_a, only_b),
                      "n": len(pairs), "only_candidate": only_a, "only_other": only_b}
    return out


def summarize(rows: list[dict], cfg: Config, seed: int, pass_k: dict) -> EvalSummary:
    models = list(dict.fromkeys(r["model"] for r in rows))
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    pick = {(m, s): [r for r in rows if r["model"] == m and r["suite"] == s]
            for m in models for s in suites}
    details = {m: {s: {**describe(pick[m, s]), **({f"pass@{cfg.pass_k}": pass_k[m][s]}
                                                 if m in pass_k else {})} for s in suites}
               for m in models}
    if "teacher" in models:  # every row as a share of the ceiling: the teacher in this budget
        for m in models:
            for s in suites:
                top = details["teacher"][s]["success"]
                details[m][s]["ceiling_share"] = details[m][s]["success"] / top if top else None
    summary: EvalSummary = {"table": {m: {s: rate(pick[m, s]) for s in suites} for m in models},
               "details": details,
               "slices": {m: {s: slices(pick[m, s]) for s in suites} for m in models},
               "tasks": {s: len(pick[models[0], s]) for s in suites}}
    # paired on the same tasks: what promotion reads (the champion, the base the candidate must
    # beat) and what rl changed (the sft model it started from)
    summary["comparison"] = {
        f"candidate_vs_{other}": compare([r for r in rows if r["model"] == "candidate"],
                                         [r for r in rows if r["model"] == other],
                                         cfg.bootstrap, seed)
        for other in ("champion", "base", "sft") if "candidate" in models and other in models}
    return summary


def pass_at_k(trajs: list, k: int) -> dict:
    """``{suite: pass@k}`` from ``k`` samples per task."""
    from coaflow.stats import pass_at_k as estimate

    per_task = defaultdict(list)
    for t in trajs:
        per_task[(t.task.suite, t.task.task_id)].append(bool(t.outcome.correct))
    by_suite = defaultdict(list)
    for (suite, _), results in per_task.items():
        by_suite[suite].append(estimate(len(results), sum(results), k))
    return {s: sum(v) / len(v) for s, v in by_suite.items()}


def metrics_of(summary: dict) -> dict[str, float]:
    m: dict[str, float] = {}
    for model, suites in summary["details"].items():
        for suite, d in suites.items():
            for key, value in d.items():
                if isinstance(value, (int, float)):
                    m[f"eval/{model}/{suite}/{key}"] = float(value)
    for name, comp in summary.get("comparison", {}).items():
        for suite, c in comp.items():
            for key in ("diff", "lo", "hi", "p_value"):
                m[f"eval/{name}/{suite}/{key}"] = float(c[key])
    return m


# --- the stage --------------------------------------------------------------------------------

def evaluate(specs: dict[str, str], tasks: list, cfg: Config, out: Path, *, seed: int,
             budgets: dict, fit: dict | None = None, tokenizer: str | None = None,
             terse: bool = False, cache: Path | None = None, registry_uri: str | None = None,
             tracker=None) -> tuple[list[dict], EvalSummary]:
    """Run every model of ``specs`` (row name -> model spec, or ``scripted``) on ``tasks``
    within ``budgets``; write outcomes, transcripts and tables under ``out``;
    ``(rows, summary)``."""
    from coaflow.schema import write_jsonl
    from coaflow.schema.render import to_text

    out.mkdir(parents=True, exist_ok=True)
    (out / "transcripts").mkdir(exist_ok=True)
    rows, pass_k, sample, seconds, cached = [], {}, [], {}, []
    common = dict(budgets=budgets, registry_uri=registry_uri, seed=seed, tokenizer=tokenizer,
                  terse=terse, cache=cache if cfg.row_cache else None)
    for model, spec in specs.items():
        start = time.perf_counter()
        field = f"evaluate {model} ({spec})"
        trajs, hit = run_model(spec, tasks, cfg, field=field, **common)
        if hit:
            cached.append(model)
        if cfg.pass_k and spec != "scripted":
            pass_k[model] = pass_at_k(run_model(
                spec, tasks, cfg, field=field, samples=cfg.pass_k, temperature=cfg.temperature,
                **common)[0], cfg.pass_k)
        seconds[model] = round(time.perf_counter() - start, 2)
        write_jsonl(out / "transcripts" / f"{model}.jsonl", trajs)
        rows += [outcome_row(model, t) for t in trajs]
        for suite in dict.fromkeys(t.task.suite for t in trajs):
            for t in [t for t in trajs if t.task.suite == suite][:cfg.transcripts]:
                sample.append(f"## {model} / {t.task.task_id}: {outcome_row(model, t)['category']}"
                              f"\n\n```\n{to_text(t)[:3000]}\n```\n")
    write_jsonl(out / "outcomes.jsonl", rows)
    (out / "transcripts" / "sample.md").write_text("\n".join(sample))
    summary = summarize(rows, cfg, seed, pass_k)
    if fit is None:
        from coaflow.agent.budget import fit_table

        fit = fit_table({}, budgets)
    summary.update(seconds=seconds, cached_rows=cached, budget=fit)
    md = eval_markdown(summary)
    (out / "table.md").write_text(md)
    (out / "table.html").write_text(eval_html(md))
    if tracker is not None:
        tracker.log_metrics(metrics_of(summary))
        for name in ("outcomes.jsonl", "table.md", "table.html"):
            tracker.log_artifact(out / name)
        tracker.log_artifact(out / "transcripts", "transcripts")
    return rows, summary


def model_specs(cfg: Config, ctx: Context) -> tuple[dict[str, str], dict, dict | None]:
    """``(specs, candidate, champion)``: the rows to evaluate and where they come from."""
    sft = ctx.input("sft")
    rl = ctx.optional("rl")
    candidate = {"source": "rl" if rl else "sft",
                 "model": str((rl or sft).path("model"))}
    specs: dict[str, str] = {}
    if "base" in cfg.models:
        base = sft.summary.get("base_model") or str(sft.path("model").parent / "base")
        if Path(base).is_absolute() and not Path(base).exists():  # the run folder has moved
            base = str(sft.path("model").parent / "base")
        specs["base"] = base
    if "sft" in cfg.models and rl is not None:
        specs["sft"] = str(sft.path("model"))
    if "candidate" in cfg.models:
        specs["candidate"] = candidate["model"]
    champion = None
    if "champion" in cfg.models:
        from coaflow.registry import CHAMPION, alias_uri, model_name

        name = model_name(ctx.run.name)
        version = champion_version(name, ctx.registry_uri, candidate_key=(rl or sft).key)
        if version is not None:
            specs["champion"] = alias_uri(name, CHAMPION)
            champion = {"version": version}
    if "teacher" in cfg.models:
        specs["teacher"] = cfg.teacher
    return specs, candidate, champion


def run(cfg: Config, ctx: Context) -> Result:
    from coaflow.agent.budget import read_record, recorded_teacher
    from coaflow.teachers.scripted import team_name

    specs, candidate, champion = model_specs(cfg, ctx)
    record = ctx.input("sft").outputs.get("budget")
    budgets, fit = budgets_for(cfg, read_record(record))
    tasks = load_test_tasks(cfg.suites, ctx.run.seed)
    rows, summary = evaluate(specs, tasks, cfg, ctx.out, seed=ctx.run.seed, budgets=budgets,
                             fit=fit, tokenizer=candidate["model"],
                             terse=recorded_teacher(record) == team_name(terse=True),
                             cache=Path(ctx.run.workdir) / "cache" / NAME,
                             registry_uri=ctx.registry_uri or None, tracker=ctx.tracker)
    summary.update(candidate=candidate, champion=champion)
    metrics = {k: v for k, v in metrics_of(summary).items()
               if k.endswith(("/success", "/format_error_rate", "/diff", "/p_value"))}
    return Result(outputs={"outcomes": str(ctx.out / "outcomes.jsonl"),
                           "transcripts": str(ctx.out / "transcripts"),
                           "table": str(ctx.out / "table.md")},
                  metrics=metrics, summary=summary)
