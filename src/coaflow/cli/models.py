"""``coaflow serve``, ``coaflow models`` (the registry: versions, aliases, promotion) and
``coaflow undeploy``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from coaflow.cli.common import EXIT_CODES_HELP, UserError, load, pipeline_options, registry_options
from coaflow.cli.common import user_errors as _user_errors


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


@click.command("serve", epilog=EXIT_CODES_HELP)
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


@click.group("models")
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


@click.command("undeploy")
@click.option("--name", help="registered model whose server to stop [<run.name>-agent of the "
              "profile]")
@pipeline_options
@_user_errors
def undeploy_cmd(name, profile, workdir, overrides, run_id):
    """Stop the managed local server that `coaflow deploy` started (target: local)."""
    from coaflow.registry import model_name
    from coaflow.stages.deploy import undeploy

    cfg = load(profile, workdir, overrides)
    name = name or model_name(cfg.run.name)
    state = undeploy(Path(cfg.run.workdir).resolve(), name)
    click.echo(f"stopped {name} version {state['version']} (pid {state['pid']}, port "
               f"{state['port']})" if state else f"no managed server for {name}")
