"""What every ``coaflow`` command shares: the exit codes it documents, errors as one line, and
the options that pick a profile, a run or a registry."""

from __future__ import annotations

import sys

import click

from coaflow.errors import exit_codes_help

PROFILE_HELP = "profile name (see src/coaflow/configs) or path to a YAML file"
EXIT_CODES_HELP = exit_codes_help()


class UserError(click.ClickException):
    """Shown as one line, without a traceback; ``exit_code`` from ``coaflow.errors``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def user_errors(fn):
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


def pipeline_options(fn):
    fn = click.option("--run-id", help="reuse (resume, cache) this run instead of starting one")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="override a config value; repeatable, e.g. --set sft.epochs=2")(fn)
    fn = click.option("--workdir", help="folder for runs and the MLflow store [run.workdir]")(fn)
    fn = click.option("--profile", default="default", show_default=True, help=PROFILE_HELP)(fn)
    return fn


def load(profile, workdir, overrides):
    from coaflow.config import load_config

    overrides = list(overrides) + ([f"run.workdir={workdir}"] if workdir else [])
    return load_config(profile, overrides)


def report(results) -> None:
    for name, r in results.items():
        shown = {k: v for k, v in r.metrics.items() if k != "wall_seconds"}
        click.echo(f"  {name:<11} {'cached' if r.cached else 'done':<7} "
                   + " ".join(f"{k}={v:g}" for k, v in list(shown.items())[:6]))


def registry_options(fn):
    fn = click.option("--registry-uri", help="MLflow registry [$MLFLOW_TRACKING_URI, else "
                      "sqlite:///<workdir>/mlflow.db]")(fn)
    fn = click.option("--workdir", default="work", show_default=True,
                      help="workdir whose MLflow store holds the registry")(fn)
    return fn
