"""Kubeflow Pipelines engine: the body of every KFP stage component and ``coaflow run --engine kfp``.

A KFP component of ``components/coaflow_pipeline.py`` runs one stage through the entry point every
engine shares, ``coaflow stage NAME --config PROFILE --out <its result artifact> --input
S=<input artifact> ...``: the artifact folders *are* stage folders (``result.json`` + marker), so
a stage reads an upstream artifact exactly as it reads a folder of ``coaflow run``.

Exit codes become what KFP understands: 0 done; 75 (an endpoint or the tracking server did not
answer) is retried here with backoff, because KFP's ``set_retry`` retries every failure alike (a
bad config would be retried too); 4 (promotion refused) is a decision, not a failure, so the
component succeeds and returns ``"refused"`` for the pipeline's ``dsl.If``; anything else fails
the task with the stage's own exit code.

``run_local`` runs the same pipeline on this machine with ``kfp.local.SubprocessRunner`` (no
cluster, no Docker) and links each task's result artifact into ``<workdir>/runs/<run_id>/<stage>``
so ``coaflow runs show`` and the report card read a KFP run like any other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coaflow.errors import EXIT_PROMOTION, EXIT_RETRY, CoaflowError, PipelineError

DONE, REFUSED = "done", "refused"
EXIT_FILE = "exit_code"  # left in a failed task's result folder
BACKOFF_S = 10.0  # first wait before retrying an exit 75; doubles each time


def stage_argv(stage: str, profile: str, out: str, inputs: Mapping[str, str | None],
               overrides: Sequence[str], seed: int, workdir: str) -> list[str]:
    """The ``coaflow stage`` command line of one component.

    >>> stage_argv("sft", "tiny", "/o", {"gate": "/g", "rl": None}, ["sft.epochs=1"], 3, "")[2:]
    ['coaflow.cli', 'stage', 'sft', '--config', 'tiny', '--out', '/o', '--input', 'gate=/g', \
'--set', 'sft.epochs=1', '--set', 'run.seed=3']
    """
    argv = [sys.executable, "-m", "coaflow.cli", "stage", stage, "--config", profile, "--out", out]
    for name, path in inputs.items():
        if path is not None:
            argv += ["--input", f"{name}={path}"]
    for item in overrides:
        argv += ["--set", item]
    argv += ["--set", f"run.seed={seed}"]
    if workdir:
        argv += ["--set", f"run.workdir={workdir}"]
    return argv


def run_component(stage: str, *, profile: str, overrides: Sequence[str], seed: int, workdir: str,
                  tracking_uri: str, retries: int, out: str, inputs: Mapping[str, Any],
                  metrics: Any = None, backoff_s: float = BACKOFF_S) -> str:
    """Run ``stage`` as a KFP component; ``inputs`` maps stage -> input artifact (or None).
    Returns ``"done"`` or ``"refused"``; exits with the stage's code on any other failure."""
    paths = {n: (a.path if a is not None and hasattr(a, "path") else a) for n, a in inputs.items()}
    argv = stage_argv(stage, profile, out, paths, overrides, seed, workdir)
    env = dict(os.environ, **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {}))
    for attempt in range(retries + 1):
        code = subprocess.call(argv, env=env)
        if code != EXIT_RETRY or attempt == retries:
            break
        wait = backoff_s * 2 ** attempt
        print(f"[{stage}] exit {EXIT_RETRY} (service unavailable): retry {attempt + 1}/{retries} "
              f"in {wait:.0f} s", flush=True)
        time.sleep(wait)
    if code not in (0, EXIT_PROMOTION):
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / EXIT_FILE).write_text(str(code))  # for run_local: the run's exit code
        sys.exit(code)
    result = json.loads((Path(out) / "result.json").read_text())
    if metrics is not None:
        for k, v in result.get("metrics", {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                metrics.log_metric(k, float(v))
    return REFUSED if code == EXIT_PROMOTION else DONE


# --- coaflow run --engine kfp ------------------------------------------------------------------

class KfpTaskFailed(CoaflowError):
    """A task of a local KFP run failed; its log (above) says why. The exit code is the
    stage's own (3 for a refused gate, 75 when retries ran out, ...)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def load_pipeline_module():
    """``components/coaflow_pipeline.py`` of the checkout this package runs from (or importable
    as ``components.coaflow_pipeline``)."""
    path = Path(__file__).resolve().parents[2] / "components" / "coaflow_pipeline.py"
    if path.exists():
        spec = importlib.util.spec_from_file_location("components.coaflow_pipeline", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module("components.coaflow_pipeline")
    except ImportError:
        raise PipelineError("the kfp engine needs components/coaflow_pipeline.py of a coaflow "
                            "checkout (run from the repository root)") from None


def run_local(profile: str, overrides: Sequence[str], seed: int, workdir: Path, run_id: str,
              report_uri: str | None = None, log=print) -> dict[str, Path]:
    """Run the KFP pipeline with ``kfp.local.SubprocessRunner``; returns stage -> stage folder
    (linked under ``<workdir>/runs/<run_id>/``, with the run's report card, whose curves come
    from MLflow at ``report_uri``)."""
    from kfp import local

    from coaflow import report

    pipeline = load_pipeline_module().coaflow_pipeline
    workdir = Path(workdir).resolve()
    root = workdir / "kfp" / run_id
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(root / "workspace"))
    os.environ["COAFLOW_RUN_ID"] = run_id  # the tasks' MLflow runs carry the run id
    log(f"run {run_id} on kfp.local ({root})")
    try:
        pipeline(profile=profile, overrides=list(overrides), seed=seed, workdir=str(workdir),
                 tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", ""))
    except RuntimeError as e:
        stage, code = failed_task(root)
        raise KfpTaskFailed(f"the KFP pipeline failed at {stage or 'a task'} (exit {code}): {e}",
                            code) from None
    finally:
        os.environ.pop("COAFLOW_RUN_ID", None)
        folders = link_results(root, workdir / "runs" / run_id)
        if folders:
            report.write(workdir / "runs" / run_id, report_uri)
    return folders


def link_results(root: Path, run_dir: Path) -> dict[str, Path]:
    """Symlink ``<root>/<pipeline run>/<stage>/result`` to ``<run_dir>/<stage>`` for every task
    that left a result folder."""
    from coaflow.pipeline import ORDER

    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name != "workspace"),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = {}
    for stage in ORDER:
        src = runs[-1] / stage / "result"
        if src.is_dir():
            dst = run_dir / stage
            if dst.is_symlink():
                dst.unlink()
            if not dst.exists():
                dst.symlink_to(src)
            folders[stage] = src
    return folders


def failed_task(root: Path) -> tuple[str | None, int]:
    """(stage, exit code) of the task that failed in the newest pipeline run under ``root``."""
    markers = sorted(root.glob(f"*/*/result/{EXIT_FILE}"), key=lambda p: p.stat().st_mtime)
    if not markers:
        return None, 1
    return markers[-1].parent.parent.name, int(markers[-1].read_text())
