"""The one command every orchestrated task runs: ``coaflow stage NAME ...``.

An Airflow task (a subprocess on the worker or a pod), a Kubeflow task and a Kubeflow Trainer
node all run the same argv; only how they start it differs (``local``: this interpreter).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from coaflow.errors import UserError


def stage_argv(stage: str, *, profile: str, out: str,
               inputs: Mapping[str, str | Sequence[str] | None] = {},  # noqa: B006
               overrides: Sequence[str] = (), run_id: str | None = None) -> list[str]:
    """``coaflow stage`` for one stage: its profile, its folder, its overrides and the folders
    of the stages it reads (``None``: that stage did not run; a list: the folders of a stage
    run in shards, in shard order, one ``--input`` each).

    >>> stage_argv("sft", profile="tiny", out="/o", inputs={"gate": "/g", "rl": None},
    ...            overrides=["sft.epochs=1"], run_id="r1")
    ['coaflow', 'stage', 'sft', '--config', 'tiny', '--out', '/o', '--run-id', 'r1', \
'--set', 'sft.epochs=1', '--input', 'gate=/g']
    """
    argv = ["coaflow", "stage", stage, "--config", profile, "--out", out]
    if run_id:
        argv += ["--run-id", run_id]
    for item in overrides:
        argv += ["--set", item]
    for name, folder in sorted(inputs.items()):
        for one in [folder] if isinstance(folder, str) or folder is None else folder:
            if one is not None:
                argv += ["--input", f"{name}={one}"]
    return argv


def local(argv: Sequence[str], python: str | None = None) -> list[str]:
    """``argv`` run by ``python`` (default: this interpreter) rather than the ``coaflow``
    script, which a worker's PATH may not hold."""
    return [python or sys.executable, "-m", "coaflow.cli", *argv[1:]]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 (a UserError), not usage + exit 2
        raise UserError(f"{self.prog}: {message}")


def parse(argv: list[str]) -> argparse.Namespace:
    """``stage_argv``'s options read back: what a torchrun worker (``coaflow.launch``) and the
    Trainer launch step need of the argv rank 0 runs. Bad options are a ``UserError``."""
    p = _Parser(prog="coaflow stage")
    p.add_argument("command", choices=["stage"])
    p.add_argument("name")
    p.add_argument("--config", default="tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--input", dest="inputs", action="append", default=[])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--run-id", default=None)
    p.add_argument("--no-cache", action="store_true")
    return p.parse_args(argv)


def input_folders(items: Sequence[str]) -> dict[str, list[str]]:
    """``--input STAGE=DIR`` options as ``{stage: [folders]}`` (a stage named twice or more:
    its shards' folders, in the order given).

    >>> input_folders(["gate=/g", "synthesize=/s0", "synthesize=/s1"])
    {'gate': ['/g'], 'synthesize': ['/s0', '/s1']}
    """
    pairs: dict[str, list[str]] = {}
    for item in items:
        stage, sep, folder = item.partition("=")
        if not sep or not stage or not folder:
            raise UserError(f"--input {item!r}: expected STAGE=DIR, e.g. gate=/data/r1/gate")
        pairs.setdefault(stage, []).append(folder)
    return pairs
