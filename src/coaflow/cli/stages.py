"""One subcommand per stage (``coaflow sft`` = that stage of a pipeline run), and the standalone
modes of three of them, outside any run: ``coaflow synthesize --output DIR``, ``coaflow gate
--input IN --output DIR`` and ``coaflow evaluate --model SPEC``. The stage modules know nothing
of the command line; their help text is their docstring."""

from __future__ import annotations

import time
from pathlib import Path

import click

from coaflow.cli.common import load, pipeline_options, report, user_errors
from coaflow.errors import PipelineError


def stage_command(name: str) -> click.Command:
    """``coaflow NAME``: stage NAME of a run; with a standalone option, that mode instead."""
    from coaflow.contract import load_stage

    doc = (load_stage(name).__doc__ or name).strip()
    options, standalone = STANDALONE.get(name, ((), None))

    @pipeline_options
    @user_errors
    def cmd(profile, workdir, overrides, run_id, **extra):
        from coaflow.runner import run_pipeline

        cfg = load(profile, workdir, overrides)
        if standalone is not None and any(v not in (None, (), False) for v in extra.values()):
            standalone(cfg, **extra)
            return
        report(run_pipeline(cfg, run_id=run_id, only=[name]))

    for opt in reversed(options):
        cmd = opt(cmd)
    return click.command(name, help=doc, short_help=doc.splitlines()[0])(cmd)


def _with(section, what: str, **updates):
    """``section`` with ``updates``, checked as the profile's values are."""
    from pydantic import ValidationError

    try:
        return type(section).model_validate({**section.model_dump(), **updates})
    except ValidationError as e:
        raise PipelineError(f"{what}: {e.errors()[0]['msg'].removeprefix('Value error, ')}"
                            ) from None


# --- synthesize --output DIR ----------------------------------------------------------------------

SYNTHESIZE_OPTIONS = [
    click.option("--teacher", type=click.Choice(["scripted", "llm"]), help="which teacher team"),
    click.option("--suite", multiple=True, help="suite to solve (repeatable); default: the "
                 "profile's synthesize.suites"),
    click.option("-n", "n", type=int, help="tasks per suite"),
    click.option("--output", type=click.Path(file_okay=False), help="standalone: write here, "
                 "outside any pipeline run"),
]


def synthesize(cfg, teacher=None, suite=(), n=None, output=None) -> None:
    """``coaflow synthesize --output DIR``: the same code, outside a pipeline run."""
    from coaflow.runner import write_result
    from coaflow.stages.synthesize import synthesize as solve

    section = cfg.synthesize
    updates = {}
    if teacher:
        updates["teacher"] = teacher
    if suite or n is not None:
        names = list(suite) or list(section.suites)
        updates["suites"] = {s: n if n is not None else section.suites.get(s, 10) for s in names}
    if not output:
        raise click.UsageError("standalone synthesize needs --output DIR")
    section = _with(section, "synthesize", **updates)
    res = solve(section, Path(output), cfg.run.seed, Path(cfg.run.workdir) / "cache" / "llm")
    write_result(Path(output), res)  # what it wrote, for `coaflow gate --input` and `data`
    click.echo(f"wrote {res.metrics['trajectories']} trajectories to {res.outputs['trajectories']}"
               f" (success rate {res.metrics['teacher_success_rate']:.0%}, "
               f"{res.metrics['failed_attempts']} failed attempts)")


# --- gate --input IN --output DIR ----------------------------------------------------------------

GATE_OPTIONS = [
    click.option("--input", "input", type=click.Path(exists=True), help="standalone: a "
                 "trajectory file or folder of shards (.jsonl, .jsonl.gz) to gate"),
    click.option("--output", "output", type=click.Path(), help="standalone: folder for "
                 "accepted/, quarantine.jsonl, data_docs/ and gate_report.json"),
]


def gate(cfg, input=None, output=None) -> None:
    """``coaflow gate --input FILE_OR_DIR --output DIR``: the same gate, outside a pipeline run
    (``cfg.run.seed`` picks the test split it decontaminates against)."""
    from coaflow.runner import write_result
    from coaflow.stages.gate import gate_folder, gate_result

    if not input or not output:
        raise PipelineError("coaflow gate: --input and --output go together (a trajectory file "
                            "or folder, and a folder for the results)")
    found = gate_folder(cfg.gate, input, output, seed=cfg.run.seed)
    write_result(Path(output), gate_result(found, Path(output)))
    click.echo(f"gate: {found['accepted']}/{found['in']} accepted "
               f"({found['accepted_fraction']:.1%}) -> {found['accepted_dir']}")
    for reason, k in found["reasons"].items():
        click.echo(f"  rejected {reason:<18} {k}")
    click.echo(f"quarantine: {found['quarantine']}\nData Docs: {found['data_docs']}")


# --- evaluate --model SPEC -----------------------------------------------------------------------

EVALUATE_OPTIONS = [
    click.option("--model", "model", help="standalone: evaluate this model (a folder, hub id, "
                 "models:/NAME@ALIAS or http(s)://HOST/v1 endpoint)"),
    click.option("--suite", multiple=True, help="suite (repeatable); default: evaluate.suites"),
    click.option("-n", "n", type=int, help="test tasks per suite"),
    click.option("--output", type=click.Path(file_okay=False), help="standalone: write outcomes "
                 "and tables here [<workdir>/eval/<time>]"),
]


def evaluate(cfg, model=None, suite=(), n=None, output=None) -> None:
    """``coaflow evaluate --model SPEC``: one model on the test split, outside a pipeline run,
    within the documented default budget (no training data here to derive one from)."""
    from coaflow.registry import run_registry
    from coaflow.report import eval_markdown
    from coaflow.stages import evaluate as ev

    if not model:
        raise click.UsageError("standalone evaluate needs --model")
    section = cfg.evaluate
    if suite or n is not None:
        names = list(suite) or list(section.suites)
        section = _with(section, "evaluate", suites={
            s: n if n is not None else section.suites.get(s, 60) for s in names})
    out = Path(output or Path(cfg.run.workdir) / "eval" / time.strftime("%Y%m%d-%H%M%S"))
    tasks = ev.load_test_tasks(section.suites, cfg.run.seed)
    budgets, fit = ev.budgets_for(section, {})
    tokenizer = None
    if model == "scripted" and cfg.sft.model != "tiny":
        from coaflow.models.sources import resolve

        tokenizer = resolve(cfg.sft.model)  # the teacher's turns in the profile student's tokens
    _, summary = ev.evaluate({"model": model}, tasks, section, out, seed=cfg.run.seed,
                             budgets=budgets, fit=fit, tokenizer=tokenizer,
                             cache=Path(cfg.run.workdir) / "cache" / ev.NAME,
                             registry_uri=run_registry(cfg))
    click.echo(f"model: {model}\n" + eval_markdown(summary))
    click.echo(f"outcomes: {out / 'outcomes.jsonl'}")


STANDALONE = {"synthesize": (SYNTHESIZE_OPTIONS, synthesize), "gate": (GATE_OPTIONS, gate),
              "evaluate": (EVALUATE_OPTIONS, evaluate)}
