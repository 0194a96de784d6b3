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

PROFILE_HELP = "profile name (see src/coaflow/configs) or path to a YAML file"


EXIT_CODES_HELP = """\b
Exit codes (what an orchestrator acts on):
  0   done (cached stages count as done)
  1   a bug: read the traceback, do not retry
  2   bad config, file or argument: fix the input
  3   a data quality gate refused the batch (see the gate's quarantine)
  4   promotion refused: the candidate did not beat the champion; nothing moved
  75  an endpoint or tracking server was unreachable or timed out: retry
"""


class UserError(click.ClickException):
    """Shown as one line, without a traceback; ``exit_code`` from ``coaflow.errors``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _user_errors(fn):
    """Turn the errors a user or the outside world can cause into one line and an exit code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from coaflow.errors import CoaflowError, PromotionRefused
        from coaflow.tracking import Terminated, redact  # redact: a URL's password, never shown

        try:
            return fn(*a, **kw)
        except Terminated as e:  # SIGTERM: one line and 143 (128 + 15), as a shell reports it
            click.echo(f"coaflow: {e}; stopped", err=True)
            sys.exit(143)
        except PromotionRefused as e:
            click.echo(f"promotion refused: {redact(str(e))}", err=True)
            sys.exit(e.exit_code)
        except CoaflowError as e:
            raise UserError(redact(str(e)), e.exit_code) from None
        except FileNotFoundError as e:
            raise UserError(redact(str(e))) from None

    return wrapper


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


def pipeline_options(fn):
    fn = click.option("--run-id", help="reuse (resume, cache) this run instead of starting one")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="override a config value; repeatable, e.g. --set sft.epochs=2")(fn)
    fn = click.option("--workdir", help="folder for runs and the MLflow store [run.workdir]")(fn)
    fn = click.option("--profile", default="default", show_default=True, help=PROFILE_HELP)(fn)
    return fn


def _load(profile, workdir, overrides):
    from coaflow.config import load_config

    overrides = list(overrides) + ([f"run.workdir={workdir}"] if workdir else [])
    return load_config(profile, overrides)


def _report(results) -> None:
    for name, r in results.items():
        shown = {k: v for k, v in r.metrics.items() if k != "wall_seconds"}
        click.echo(f"  {name:<11} {'cached' if r.cached else 'done':<7} "
                   + " ".join(f"{k}={v:g}" for k, v in list(shown.items())[:6]))


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
@_user_errors
def run_cmd(profile, workdir, overrides, run_id, start_from, only, no_cache, engine):
    """Run the pipeline: every stage in order, each cached and tracked in MLflow.

    A stage whose config and inputs match one completed before (in this run or any earlier run
    under the workdir) is reused instead of redone; a stage that was killed half way starts clean
    or resumes. Results land in <workdir>/runs/<run_id>/<stage>/result.json and in MLflow (one
    parent run, one nested run per stage).
    """
    from coaflow.contract import check_run_id, new_run_id
    from coaflow.runner import run_pipeline

    cfg = _load(profile, workdir, overrides)
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
@_user_errors
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
    _report({name: result})


def _stage_command(name: str):
    from coaflow.contract import load_stage

    module = load_stage(name)
    doc = (module.__doc__ or name).strip()

    @pipeline_options
    @_user_errors
    def cmd(profile, workdir, overrides, run_id, **extra):
        from coaflow.runner import run_pipeline

        standalone = getattr(module, "standalone", None)
        if standalone is not None and any(v not in (None, (), False) for v in extra.values()):
            standalone(_load(profile, workdir, overrides), **extra)
            return
        cfg = _load(profile, workdir, overrides)
        _report(run_pipeline(cfg, run_id=run_id, only=[name]))

    for opt in reversed(getattr(module, "CLI_OPTIONS", [])):
        cmd = opt(cmd)
    return click.command(name, help=doc, short_help=doc.splitlines()[0])(cmd)


def _register_stages() -> None:
    """One subcommand per stage module that exists; ``coaflow --help`` names them in order."""
    from coaflow.contract import ORDER

    for name in ORDER:
        main.add_command(_stage_command(name))
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
@_user_errors
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
@_user_errors
def runs_report(run_id, workdir):
    """(Re)write RUN_ID's self-contained HTML report card and print its path."""
    from coaflow.report import write
    from coaflow.runner import show_run
    from coaflow.tracking import default_uri

    info = show_run(workdir, run_id)
    click.echo(write(Path(info["path"]), default_uri(workdir)))


# --- serving and the registry --------------------------------------------------------------------

def _registry(workdir: str, registry_uri: str | None):
    """The registry a `models` command reads or moves. A SQLite store that does not exist is
    an error, not a new empty one: looking must not create state (a mistyped --workdir)."""
    from coaflow.registry import Registry
    from coaflow.registry import registry_uri as where

    uri = where(workdir, registry=registry_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no registry at {uri[len('sqlite:///'):]} (--workdir {workdir}): "
                        "nothing registered there yet")
    return Registry(uri)


def _reason(ctx, param, value: str) -> str:
    """A promotion or rollback is recorded with why: an empty reason is refused."""
    if not value or not value.strip():
        raise click.BadParameter("a reason is required (why this version?)")
    return value.strip()


VERSION = click.IntRange(1, 2**31 - 1)  # MLflow stores versions as 32-bit integers


def registry_options(fn):
    fn = click.option("--registry-uri", help="MLflow registry [$MLFLOW_TRACKING_URI, else "
                      "sqlite:///<workdir>/mlflow.db]")(fn)
    fn = click.option("--workdir", default="work", show_default=True,
                      help="workdir whose MLflow store holds the registry")(fn)
    return fn


@main.command("serve", epilog=EXIT_CODES_HELP)
@click.argument("model", metavar="MODEL")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--engine", type=click.Choice(["auto", "transformers", "vllm"]), default="auto",
              show_default=True, help="auto: vLLM when installed and a GPU is there")
@click.option("--name", help="model name clients send [the registered model or folder name]")
@click.option("--system-prompt", help="system prompt when a client sends none [the one recorded "
              "with the model]")
@click.option("--max-batch", default=16, show_default=True, help="sequences decoded together; "
              "shared out by request, not by row")
@click.option("--max-n", default=16, show_default=True, help="largest n (choices) a request may "
              "ask for; more is a 400 naming n")
@click.option("--batch-wait-ms", default=10.0, show_default=True,
              help="how long the first request on an idle server waits for others")
@click.option("--prefill-chunk", default=256, show_default=True, help="prompt tokens encoded "
              "between two decode steps (a short request waits at most one chunk)")
@click.option("--prefix-cache-mb", default=1024, show_default=True, help="memory for keys and "
              "values of finished contexts a later request may start with (0: none)")
@click.option("--max-tokens", default=512, show_default=True, help="default max_tokens")
@click.option("--reuse-port", is_flag=True, help="bind with SO_REUSEPORT (a replacement server "
              "starts beside the old one)")
@click.option("--vllm-arg", "vllm_args", multiple=True, help="extra argument for vLLM's server")
@click.option("--threads", default=0, show_default=True, help="torch CPU threads (0: torch's "
              "default; 1 is fastest on a CPU shared with other work)")
@registry_options
@_user_errors
def serve_cmd(model, host, port, engine, name, system_prompt, max_batch, max_n, batch_wait_ms,
              prefill_chunk, prefix_cache_mb, max_tokens, reuse_port, vllm_args, threads, workdir,
              registry_uri):
    """Serve MODEL behind an OpenAI-compatible API: models:/NAME@ALIAS, models:/NAME/N, a local
    HF folder or a hub id.

    \b
    coaflow serve models:/coaflow-agent@champion --port 8000
    curl localhost:8000/v1/models ; curl localhost:8000/metrics
    """
    from coaflow.registry import registry_uri as where
    from coaflow.serving.server import serve

    serve(model, host=host, port=port, engine=engine, name=name, system_prompt=system_prompt,
          registry_uri=where(workdir, registry=registry_uri),
          cache_dir=Path(workdir).resolve() / "serving" / "models", max_batch=max_batch,
          batch_wait_ms=batch_wait_ms, max_tokens=max_tokens, reuse_port=reuse_port,
          vllm_args=list(vllm_args), threads=threads, max_n=max_n, prefill_chunk=prefill_chunk,
          prefix_cache_mb=prefix_cache_mb, log=lambda m: click.echo(m, err=True))


@main.group("models")
def models_group():
    """The model registry: versions, aliases (champion, previous, challenger), promotion."""


@models_group.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="versions with all their tags as JSON")
@registry_options
@_user_errors
def models_list(name, as_json, workdir, registry_uri):
    """Versions of NAME (default: every registered model): aliases, evaluation, lineage."""
    from dataclasses import asdict

    reg = _registry(workdir, registry_uri)
    names = [name] if name else reg.models()
    if name and not reg.exists(name):
        raise UserError(f"no registered model {name!r} in {reg.uri} "
                        f"(models: {', '.join(reg.models()) or 'none'})")
    rows = [v for n in names for v in reg.versions(n)]
    if as_json:
        click.echo(json.dumps([asdict(v) for v in rows], indent=2))
        return
    if not rows:
        click.echo(f"no registered models in {reg.uri}")
    for v in rows:
        evals = " ".join(f"{k[5:]}={t.split(' ')[0]}" for k, t in sorted(v.tags.items())
                         if k.startswith("eval.candidate.") or k.startswith("eval.vs_champion."))
        click.echo(f"{v.name} v{v.version:<3} {','.join(v.aliases) or '-':<22} "
                   f"run={v.tags.get('coaflow.run_id', '-')} "
                   f"from={v.tags.get('coaflow.candidate_source', '-')} "
                   f"commit={v.tags.get('coaflow.git_commit', '-')[:8]}  {evals}")


@models_group.command("promote")
@click.argument("name")
@click.argument("version", type=VERSION)
@click.option("--reason", required=True, callback=_reason,
              help="why (recorded as a tag on the version)")
@registry_options
@_user_errors
def models_promote(name, version, reason, workdir, registry_uri):
    """Make VERSION of NAME the champion by hand; the old champion becomes previous."""

    old = _registry(workdir, registry_uri).promote(name, version, f"by hand: {reason}")
    click.echo(f"{name}: champion is version {version}"
               + (f" (previous: version {old.version})" if old and old.version != version else ""))


@models_group.command("rollback")
@click.argument("name")
@click.option("--reason", required=True, callback=_reason,
              help="why (recorded as a tag on both versions)")
@registry_options
@_user_errors
def models_rollback(name, reason, workdir, registry_uri):
    """Move NAME's champion back to its previous version."""

    now, was = _registry(workdir, registry_uri).rollback(name, reason)
    click.echo(f"{name}: champion is version {now.version} again (rolled back from "
               f"version {was.version})")


@models_group.command("fetch")
@click.argument("uri", metavar="models:/NAME@ALIAS")
@click.option("--dst", default=None, help="folder to download into [<workdir>/serving/models]")
@registry_options
@_user_errors
def models_fetch(uri, dst, workdir, registry_uri):
    """Download a registered model (an HF folder) and print its path."""

    folder, v = _registry(workdir, registry_uri).fetch(
        uri, dst or Path(workdir).resolve() / "serving" / "models")
    click.echo(str(folder))


@main.command("undeploy")
@click.option("--name", help="registered model whose server to stop [<run.name>-agent of the "
              "profile]")
@pipeline_options
@_user_errors
def undeploy_cmd(name, profile, workdir, overrides, run_id):
    """Stop the managed local server that `coaflow deploy` started (target: local)."""
    from coaflow.registry import model_name
    from coaflow.stages.deploy import undeploy

    cfg = _load(profile, workdir, overrides)
    name = name or model_name(cfg.run.name)
    state = undeploy(Path(cfg.run.workdir).resolve(), name)
    click.echo(f"stopped {name} version {state['version']} (pid {state['pid']}, port "
               f"{state['port']})" if state else f"no managed server for {name}")


# --- config -------------------------------------------------------------------------------------

@main.command("config")
@click.option("--profile", default="default", show_default=True, help=PROFILE_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option("--show-secrets", is_flag=True, help="print secrets as they are (a URL's "
              "password, a key's value) instead of ***")
@_user_errors
def config_cmd(profile, overrides, show_secrets):
    """Print the resolved config of a profile (after --set overrides) as YAML.

    Secrets are shown as *** (as the run's own config.yaml and MLflow record them) unless
    --show-secrets is given, as `kubectl config view` does with --raw."""
    import yaml

    from coaflow.config import load_config
    from coaflow.tracking import redact

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
@_user_errors
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
@_user_errors
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
@_user_errors
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
from coaflow.envs.cli import env_group  # noqa: E402, I001
main.add_command(env_group)

if __name__ == "__main__":
    main()
