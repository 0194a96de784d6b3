"""``coaflow env``: look at suites, sample tasks and call tools by hand when debugging.

    coaflow env list
    coaflow env sample kbqa --split test -n 3 --seed 1
    coaflow env call kbqa search --args '{"query": "Varn Labs"}'
    coaflow env call calc python --args '{"code": "print(6*7)"}'
    coaflow env call calc python --args @call.json        # arguments from a file (any size)
    python make_args.py | coaflow env call calc python --args -      # ... or from stdin
"""

from __future__ import annotations

import json
from pathlib import Path

import click


class _EnvError(click.ClickException):
    exit_code = 2


@click.group("env")
def env_group():
    """Inspect the task suites: list them, sample tasks, run one tool call."""


@env_group.command("list")
def list_cmd():
    """One line per suite: its name, tools and splits."""
    from coaflow import envs

    for name, module in envs.SUITES.items():
        tools = ", ".join(s["function"]["name"] for s in envs.tool_schemas(name))
        doc = (module.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:<6} tools: {tools:<20} splits: {', '.join(envs.SPLITS)}  {doc}")


@env_group.command("sample")
@click.argument("suite")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "rl",
              "validation", "test"]), help="which split to draw from")
@click.option("-n", "n", default=5, show_default=True, type=click.IntRange(0), help="how many tasks")
@click.option("--seed", default=0, show_default=True, help="sampling seed (same seed, same tasks)")
@click.option("--world-seed", type=int, help="kbqa only: seed of the fictional world [0]")
@click.option("--n-entities", type=int, help="kbqa only: size of the world [400]")
def sample_cmd(suite, split, n, seed, world_seed, n_entities):
    """Print N tasks of SUITE as JSON lines (question, answer, difficulty, gold metadata)."""
    from coaflow import envs

    kw = {k: v for k, v in (("world_seed", world_seed), ("n_entities", n_entities)) if v is not None}
    try:
        tasks = envs.make_tasks(suite, split, n, seed=seed, **kw)
    except ValueError as e:
        raise _EnvError(str(e)) from None
    for t in tasks:
        click.echo(t.model_dump_json())


@env_group.command("call")
@click.argument("suite")
@click.argument("tool")
@click.option("--args", "args_json", default="{}", show_default=True, metavar="JSON|@FILE|-",
              help='the tool arguments as a JSON object, e.g. \'{"code": "print(1)"}\'; '
              "@FILE reads it from FILE and - from stdin (for code past the ~128 KB a command "
              "line holds)")
@click.option("--world-seed", type=int, help="kbqa only: seed of the fictional world [0]")
@click.option("--n-entities", type=int, help="kbqa only: size of the world [400]")
def call_cmd(suite, tool, args_json, world_seed, n_entities):
    """Run one TOOL call of SUITE and print {"observation": ...} as JSON."""
    import signal
    import sys

    from coaflow import envs

    # SIGTERM (a timeout, an orchestrator) ends the call through its cleanup: the sandbox dies
    # with this process anyway (its lifeline), and its temp folder goes now, not on the next call
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    where = "--args"
    if args_json == "-":
        where, args_json = "--args - (stdin)", click.get_text_stream("stdin").read()
    elif args_json.startswith("@"):
        where = f"--args {args_json}"
        try:
            args_json = Path(args_json[1:]).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise _EnvError(f"{where}: cannot read {args_json[1:]} ({e})") from None
    try:
        args = json.loads(args_json)
    except json.JSONDecodeError as e:
        raise _EnvError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
                        ) from None
    except RecursionError:
        raise _EnvError(f"{where}: nested too deeply") from None
    if not isinstance(args, dict):
        raise _EnvError(f"{where}: expected a JSON object like '{{\"query\": \"...\"}}'")
    try:
        kw = {k: v for k, v in (("world_seed", world_seed), ("n_entities", n_entities))
              if v is not None and suite == "kbqa"}
        obs = envs.call_tool(suite, tool, args, **kw)
    except ValueError as e:
        raise _EnvError(str(e)) from None
    click.echo(json.dumps({"observation": obs}, ensure_ascii=False))
