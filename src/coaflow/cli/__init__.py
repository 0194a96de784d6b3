"""``coaflow``: run the pipeline or one stage, inspect runs, convert and check data.

    coaflow run                                  # every stage on the default profile
    coaflow run --profile qwen3-0.6b-1gpu --set sft.epochs=2
    coaflow run --run-id 20261128-101500-ab12 --from sft   # reuse earlier stages of a run
    coaflow runs list | coaflow runs show RUN
    coaflow data convert --from sharegpt --to coaflow in.jsonl out.jsonl
"""

from __future__ import annotations

import inspect
import json
import sys
from collections import Counter
from pathlib import Path

import click

from coaflow import __version__
from coaflow.cli.common import (
    EXIT_CODES_HELP,
    PROFILE_HELP,
    UserError,
    load,
    pipeline_options,
    report,
    user_errors,
)
from coaflow.cli.models import models_group, serve_cmd, undeploy_cmd
from coaflow.cli.stages import stage_command
from coaflow.envs.cli import env_group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="coaflow")
def main():
    """coaflow: train agent foundation models with the Chain-of-Agents recipe.

    A teacher team solves verifiable tasks with real tools; its runs become chain-of-agents
    trajectories; gates keep the good ones; SFT trains one student to act as the whole team;
    evaluation scores it on held-out tasks; MLflow tracks every stage. Each stage is also a subcommand, and `coaflow stage` is the
    entry point containers, Airflow and Kubeflow call.
    """
    from coaflow.tracking import terminate_as_interrupt

    terminate_as_interrupt()  # SIGTERM unwinds: MLflow runs end KILLED, not RUNNING


@main.command("run", epilog=EXIT_CODES_HELP)
@pipeline_options
@click.option("--from", "start_from", metavar="STAGE", help="start at STAGE; earlier stages' "
              "results come from --run-id")
@click.option("--only", multiple=True, metavar="STAGE", help="run only STAGE (repeatable)")
@click.option("--no-cache", is_flag=True, help="redo every selected stage, even when a stage "
              "with the same inputs and config completed before")
@click.option("--engine", type=click.Choice(["local", "kfp"]), default="local", show_default=True,
              help="local: stages in this process; kfp: the Kubeflow pipeline on kfp.local "
              "(components/coaflow_pipeline.py, one subprocess per stage)")
@user_errors
def run_cmd(profile, workdir, overrides, run_id, start_from, only, no_cache, engine):
    """Run the pipeline: every stage in order, each cached and tracked in MLflow.

    A stage whose config and inputs match one completed before (in this run or any earlier run
    under the workdir) is reused instead of redone; a stage that was killed half way starts clean
    or resumes. Results land in <workdir>/runs/<run_id>/<stage>/result.json and in MLflow (one
    parent run, one nested run per stage).
    """
    from coaflow.contract import check_run_id, new_run_id
    from coaflow.runner import run_pipeline

    cfg = load(profile, workdir, overrides)
    run_id = check_run_id(run_id) if run_id else new_run_id()
    if engine == "kfp":
        if start_from or only or no_cache:
            raise UserError("--from, --only and --no-cache work with --engine local only: a KFP "
                            "run is the whole pipeline (KFP and the stage cache reuse stages)")
        from coaflow.orchestrate.kfp import run_local
        from coaflow.tracking import default_uri

        try:
            run_local(profile, list(overrides), cfg.run.seed, Path(cfg.run.workdir), run_id,
                      report_uri=(cfg.tracking.uri or default_uri(cfg.run.workdir))
                      if cfg.tracking.enabled else None)
        finally:
            _summary(Path(cfg.run.workdir).resolve() / "runs" / run_id)
        return
    try:
        run_pipeline(cfg, run_id=run_id, only=list(only) or None, start_from=start_from,
                     use_cache=not no_cache)
    finally:
        _summary(Path(cfg.run.workdir).resolve() / "runs" / run_id)


def _summary(run_dir: Path) -> None:
    """The report card in the terminal, once the run has ended (however it ended)."""
    from coaflow.report import collect, render_text

    if run_dir.is_dir():
        click.echo("\n" + render_text(collect(run_dir)))
        if (run_dir / "report.html").exists():
            click.echo(f"report: {run_dir / 'report.html'}")


@main.command("stage", epilog=EXIT_CODES_HELP)
@click.argument("name")
@click.option("--config", "config", default="default", show_default=True, metavar="FILE|PROFILE",
              help="resolved config YAML (as `coaflow config` prints it) or a profile name")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="the stage's folder: it ends with result.json and a .complete marker")
@click.option("--input", "inputs", multiple=True, metavar="STAGE=DIR",
              help="a completed input stage folder, e.g. --input gate=/data/r1/gate (repeatable)")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override a config value; repeatable")
@click.option("--run-id", help="pipeline run id recorded in MLflow [$COAFLOW_RUN_ID, else new]")
@click.option("--no-cache", is_flag=True, help="run even if a completed stage has the same key")
@user_errors
def stage_cmd(name, config, out, inputs, overrides, run_id, no_cache):
    """Run one stage NAME in folder --out from its input folders: the entry point that every
    engine calls (a container, an Airflow task, a Kubeflow component, `coaflow run` itself).

    \b
    coaflow stage gate --config run.yaml --out /data/r1/gate --input synthesize=/data/r1/synthesize
    coaflow stage sft  --config tiny --out /tmp/sft --input gate=/tmp/gate --set sft.epochs=1

    The folder holds result.json (paths inside it relative, so it can move) and ends with the
    .complete marker; rerunning with the same config and inputs is a cache hit. A stage named
    by several --input options is one an engine ran in shards (synthesize.shards).
    """
    from coaflow.config import load_config
    from coaflow.orchestrate.command import input_folders
    from coaflow.runner import execute

    pairs = input_folders(inputs)  # a stage named twice or more: its shards' folders
    cfg = load_config(config, overrides)
    result = execute(name, cfg, out, pairs, run_id=run_id, use_cache=not no_cache)
    report({name: result})


def _register_stages() -> None:
    """One subcommand per stage module that exists; ``coaflow --help`` names them in order."""
    from coaflow.contract import ORDER

    for name in ORDER:
        main.add_command(stage_command(name))
    main.help = inspect.cleandoc(main.help or "") + f"\n\nStages, in order: {', '.join(ORDER)}."


# --- runs ---------------------------------------------------------------------------------------

@main.group("runs")
def runs_group():
    """List and inspect pipeline runs under the workdir."""


@runs_group.command("list")
@click.option("--workdir", default="work", show_default=True)
def runs_list(workdir):
    """One line per run: id and the status of each stage."""
    from coaflow.runner import list_runs

    rows = list_runs(workdir)
    if not rows:
        click.echo(f"no runs under {Path(workdir) / 'runs'}")
    for row in rows:
        click.echo(f"{row['run_id']}  " + " ".join(f"{k}:{v}" for k, v in row["stages"].items()))


@runs_group.command("show")
@click.argument("run_id")
@click.option("--workdir", default="work", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="status, metrics and outputs as JSON")
@user_errors
def runs_show(run_id, workdir, as_json):
    """The report card of RUN_ID: stage timings, data funnel, eval table, registry decision."""
    from coaflow.report import collect, render_text
    from coaflow.runner import show_run

    info = show_run(workdir, run_id)  # one clear error for an unknown run
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(render_text(collect(Path(info["path"]))))
    report = Path(info["path"]) / "report.html"
    if report.exists():
        click.echo(f"report: {report}")


@runs_group.command("report")
@click.argument("run_id")
@click.option("--workdir", default="work", show_default=True)
@user_errors
def runs_report(run_id, workdir):
    """(Re)write RUN_ID's self-contained HTML report card and print its path."""
    from coaflow.report import write
    from coaflow.runner import show_run
    from coaflow.tracking import default_uri

    info = show_run(workdir, run_id)
    click.echo(write(Path(info["path"]), default_uri(workdir)))


# --- config -------------------------------------------------------------------------------------

@main.command("config")
@click.option("--profile", default="default", show_default=True, help=PROFILE_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--show-secrets", is_flag=True, help="print secrets as they are (a URL's "
              "password, a key's value) instead of ***")
@click.option("--explain", is_flag=True, help="every knob with its default and what it does "
              "(docs/config.md), instead of a profile's values")
@user_errors
def config_cmd(profile, overrides, show_secrets, explain):
    """Print the resolved config of a profile (after --set overrides) as YAML.

    Secrets are shown as *** (as the run's own config.yaml and MLflow record them) unless
    --show-secrets is given, as `kubectl config view` does with --raw."""
    import yaml

    from coaflow.config import explain as reference
    from coaflow.config import load_config
    from coaflow.tracking import redact

    if explain:
        click.echo(reference())
        return

    data = load_config(profile, overrides).model_dump(mode="json")
    click.echo(yaml.safe_dump(data if show_secrets else redact(data), sort_keys=False), nl=False)


# --- data ---------------------------------------------------------------------------------------

@main.group("data")
def data_group():
    """Convert, validate and summarize trajectory files (JSONL, plain or .gz)."""


@data_group.command("convert")
@click.option("--from", "src_fmt", required=True,
              type=click.Choice(["adp", "openai", "sharegpt", "coaflow"]),
              help="input format: ADP JSON lines, OpenAI chat messages, ShareGPT, or coaflow")
@click.option("--to", "dst_fmt", required=True, type=click.Choice(["coaflow", "adp", "messages"]),
              help="output: coaflow trajectories, ADP, or rendered chat messages for training")
@click.option("--suite", default="import", show_default=True,
              help="suite name recorded on imported tasks (openai/sharegpt)")
@click.option("--skip-bad", is_flag=True, help="skip bad lines (reported on stderr) instead of "
              "stopping at the first")
@click.argument("input_path", metavar="IN", type=click.Path(exists=True))
@click.argument("output_path", metavar="OUT", type=click.Path())
@user_errors
def data_convert(src_fmt, dst_fmt, suite, skip_bad, input_path, output_path):
    """Convert trajectories from IN (a JSONL or JSON-array file, a folder of shards, or a stage
    folder) to OUT (.jsonl or .jsonl.gz; ADP written as a .json array keeps that shape).

    \b
    coaflow data convert --from sharegpt --to coaflow chats.jsonl trajs.jsonl
    coaflow data convert --from coaflow --to messages trajs.jsonl sft.jsonl.gz
    """
    import functools

    from coaflow.schema import convert, io, render

    parse = convert.FROM[src_fmt]
    if src_fmt in ("openai", "sharegpt"):
        parse = functools.partial(parse, suite=suite)
    out = {"coaflow": lambda t: t, "adp": convert.to_adp,
           "messages": lambda t: {"id": t.id, "messages": render.to_messages(t)}}[dst_fmt]
    bad = []
    records = (out(t) for _, _, t in io.iter_records(
        io.trajectory_source(input_path), parse, errors="skip" if skip_bad else "raise",
        on_error=bad.append))
    n = io.write_records(output_path, records)
    for b in bad:
        click.echo(f"skipped {b.path}:{b.line}: {b.field + ': ' if b.field else ''}{b.reason}",
                   err=True)
    click.echo(f"wrote {n} records to {output_path}" + (f" ({len(bad)} skipped)" if bad else ""))


@data_group.command("validate")
@click.argument("path", type=click.Path(exists=True))
@click.option("--max-errors", default=20, show_default=True, help="errors to print")
@user_errors
def data_validate(path, max_errors):
    """Check every record of PATH against the coaflow schema; exit 2 if any is bad (or none)."""
    from coaflow.errors import EXIT_USER
    from coaflow.schema import io

    bad: list = []
    n = sum(1 for _ in io.iter_records(io.trajectory_source(path), errors="skip",
                                       on_error=bad.append))
    for b in bad[:max_errors]:
        click.echo(f"{b.path}:{b.line}: {b.field + ': ' if b.field else ''}{b.reason}", err=True)
    click.echo(f"{n} valid, {len(bad)} invalid")
    sys.exit(EXIT_USER if bad or n == 0 else 0)


@data_group.command("stats")
@click.argument("path", type=click.Path(exists=True))
@user_errors
def data_stats(path):
    """Counts per suite, difficulty, teacher and outcome, plus steps and tool calls per trajectory.
    PATH is a file, a folder of shards, or a stage folder (its trajectories are read)."""
    from coaflow.schema import io

    path = io.trajectory_source(path)
    n, steps, calls = 0, 0, 0
    by = {"suite": Counter(), "difficulty": Counter(), "teacher": Counter(), "correct": Counter(),
          "tools": Counter(), "agents": Counter()}
    for t in io.read_trajectories(path):
        n += 1
        steps += len(t.content)
        tc = t.tool_calls()
        calls += len(tc)
        by["suite"][t.task.suite] += 1
        by["difficulty"][str(t.task.difficulty)] += 1
        by["teacher"][t.provenance.teacher] += 1
        by["correct"][str(t.outcome.correct)] += 1
        by["tools"].update(getattr(c, "function", "python") for c in tc)
        by["agents"].update(s.agent for s in t.content if hasattr(s, "agent"))
    stats = {"trajectories": n, "steps_per_trajectory": round(steps / max(n, 1), 2),
             "tool_calls_per_trajectory": round(calls / max(n, 1), 2),
             **{k: dict(v.most_common()) for k, v in by.items()}}
    click.echo(json.dumps(stats, indent=2))


_register_stages()
main.add_command(serve_cmd)
main.add_command(models_group)
main.add_command(undeploy_cmd)
main.add_command(env_group)
