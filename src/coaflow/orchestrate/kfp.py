"""Kubeflow Pipelines: the coaflow pipeline, the body of its tasks and ``coaflow run --engine kfp``.

``build_pipeline(settings)`` makes the pipeline: one task per stage (``coaflow.contract.ORDER``,
the stages whose module exists), named after it and wired to the stages it reads
(``contract.reads``); the tasks after ``contract.PROMOTION`` run only when it did not refuse.
``components/coaflow_pipeline.py`` compiles it to the committed YAML. Every task runs one
component function, ``stage_task``, whose body is ``run_component``: the entry point every engine
shares, ``coaflow stage NAME --config PROFILE --out <its result artifact> --input S=<input
artifact> ...`` (``orchestrate.command``). The artifact folders *are* stage folders
(``result.json`` + marker), so a stage reads an upstream artifact exactly as it reads a folder of
``coaflow run``. They are lightweight Python components because ``kfp.local.SubprocessRunner``
runs nothing else; on a cluster they run in the coaflow images, which hold coaflow and kfp, so
nothing is pip-installed at run time.

Every Kubernetes setting of a task (image, CPU/memory requests = limits, GPUs, GPU node selector
and tolerations, RAM-backed /dev/shm, the PVC, secrets as env, the MLflow ConfigMap, the user)
comes from the settings file the Airflow DAG's pods read too (``orchestrate.k8s``). Caching
follows the stage's ``CACHE`` flag (deploy always runs).

Exit codes become what KFP understands: 0 done; 75 (an endpoint or the tracking server did not
answer) is retried here with backoff, because KFP's ``set_retry`` retries every failure alike (a
bad config would be retried too); 4 (promotion refused) is a decision, not a failure, so the
component succeeds and returns ``"refused"`` for the pipeline's ``dsl.If``; anything else fails
the task with the stage's own exit code.

``run_local`` runs the same pipeline on this machine with ``kfp.local.SubprocessRunner`` (no
cluster, no Docker) and links each task's result artifact into ``<workdir>/runs/<run_id>/<stage>``
so ``coaflow runs show`` and the report card read a KFP run like any other.
"""

# No ``from __future__ import annotations`` here: KFP reads a component's annotations as types.
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from coaflow import contract
from coaflow.errors import EXIT_PROMOTION, EXIT_RETRY, CoaflowError
from coaflow.orchestrate.command import local, stage_argv
from coaflow.orchestrate.k8s import GPU_RESOURCE, KubernetesSettings

DONE, REFUSED = "done", "refused"
EXIT_FILE = "exit_code"  # left in a failed task's result folder
BACKOFF_S = 10.0  # first wait before retrying an exit 75; doubles each time


def run_component(stage: str, *, profile: str, overrides: Sequence[str], seed: int, workdir: str,
                  tracking_uri: str, retries: int, out: str, inputs: Mapping[str, Any],
                  run_id: str = "", metrics: Any = None, backoff_s: float = BACKOFF_S) -> str:
    """Run ``stage`` as a KFP component; ``inputs`` maps stage -> input artifact (or None).
    Returns ``"done"`` or ``"refused"``; exits with the stage's code on any other failure."""
    paths = {n: (a.path if a is not None and hasattr(a, "path") else a) for n, a in inputs.items()}
    overrides = [*overrides, f"run.seed={seed}"] + ([f"run.workdir={workdir}"] if workdir else [])
    argv = local(stage_argv(stage, profile=profile, out=out, inputs=paths, overrides=overrides,
                            run_id=run_id or None))
    env = dict(os.environ, **({MLFLOW_ENV: tracking_uri} if tracking_uri else {}))
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


# --- the pipeline --------------------------------------------------------------------------------

UPSTREAM = contract.ORDER[:-1]  # the stages a task can read: every one but the last
MLFLOW_ENV = "MLFLOW_TRACKING_URI"  # the key of the MLflow ConfigMap every stage reads
RUN_NAME_FIELD = "metadata.annotations['pipelines.kubeflow.org/run_name']"


def stage_task(stage: str, profile: str, overrides: list, seed: int, workdir: str,
               tracking_uri: str, run_id: str, retries: int, result: Output[Artifact],
               metrics: Output[Metrics], synthesize: Input[Artifact] = None,
               gate: Input[Artifact] = None, sft: Input[Artifact] = None,
               rl: Input[Artifact] = None, evaluate: Input[Artifact] = None,
               register: Input[Artifact] = None) -> str:
    """Run coaflow stage ``stage`` from the upstream stage folders its task is wired to."""
    from coaflow.orchestrate.kfp import run_component

    upstream = {"synthesize": synthesize, "gate": gate, "sft": sft, "rl": rl,
                "evaluate": evaluate, "register": register}
    return run_component(stage, profile=profile, overrides=overrides, seed=seed,
                         workdir=workdir, tracking_uri=tracking_uri, run_id=run_id,
                         retries=retries, out=result.path, metrics=metrics,
                         inputs={n: a for n, a in upstream.items() if a is not None})


def stage_component(name: str, image: str):
    """``stage_task`` as the component of stage ``name`` (its tasks are named after it)."""
    unknown = set(contract.reads(name)) - set(UPSTREAM)
    if unknown:
        raise ValueError(f"stage {name!r} reads {sorted(unknown)}: stage_task has no such input")
    component = dsl.component(stage_task, base_image=image, install_kfp_package=False)
    component.name = component.component_spec.name = name
    return component


def configure(task, name: str, ks: KubernetesSettings) -> None:
    """Resources (requests = limits), caching and the Kubernetes settings of one stage task, as
    the Airflow DAG gives the same stage's pod."""
    from kfp import kubernetes

    res = ks.for_stage(name)
    task.set_caching_options(getattr(contract.load_stage(name), "CACHE", True))
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(res.gpus)
        for label, value in ks.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label, value)
        for toleration in ks.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration)
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=ks.shm_size)
    kubernetes.set_security_context(task, run_as_user=ks.uid, run_as_group=ks.uid,
                                    run_as_non_root=True)
    kubernetes.mount_pvc(task, pvc_name=ks.pvc, mount_path=ks.mount_path)
    for secret, key_to_env in ks.secret_env().items():
        kubernetes.use_secret_as_env(task, secret, key_to_env, optional=True)
    if ks.mlflow_configmap:
        kubernetes.use_config_map_as_env(task, ks.mlflow_configmap, {MLFLOW_ENV: MLFLOW_ENV})
    kubernetes.use_field_path_as_env(task, "COAFLOW_RUN_ID", RUN_NAME_FIELD)


def build_pipeline(ks: KubernetesSettings):
    """The coaflow pipeline over every stage that exists, its tasks set up by ``ks``."""
    stages = list(contract.STAGES)
    components = {n: stage_component(n, ks.image_for(n)) for n in stages}

    @dsl.pipeline(name="coaflow", description="Chain-of-Agents training: " + " -> ".join(stages))
    def coaflow_pipeline(profile: str = "default", overrides: list = [],  # noqa: B006 - a KFP default
                         seed: int = 0, workdir: str = ks.mount_path, tracking_uri: str = "",
                         run_id: str = "", retries: int = 3):
        """``profile``: a profile name or a config file in the image; ``overrides``:
        SECTION.KEY=VALUE items as ``--set`` takes them; ``tracking_uri``: empty: the MLflow
        ConfigMap's (as Airflow's pods); ``run_id``: empty: the KFP run's name; ``retries``:
        attempts after an exit 75 (service unavailable)."""
        params = dict(profile=profile, overrides=overrides, seed=seed, workdir=workdir,
                      tracking_uri=tracking_uri, run_id=run_id, retries=retries)
        tasks = {}
        with contextlib.ExitStack() as after_promotion:
            for name in stages:
                inputs = {s: tasks[s].outputs["result"] for s in contract.reads(name) if s in tasks}
                tasks[name] = components[name](stage=name, **params, **inputs)
                configure(tasks[name], name, ks)
                if name == contract.PROMOTION:
                    after_promotion.enter_context(
                        dsl.If(tasks[name].outputs["Output"] != REFUSED, name="promoted"))

    return coaflow_pipeline


def compile_pipeline(path: str | Path, ks: KubernetesSettings) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(ks), str(path))
    return Path(path)


# --- coaflow run --engine kfp ------------------------------------------------------------------

class KfpTaskFailed(CoaflowError):
    """A task of a local KFP run failed; its log (above) says why. The exit code is the
    stage's own (3 for a refused gate, 75 when retries ran out, ...)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def run_local(profile: str, overrides: Sequence[str], seed: int, workdir: Path, run_id: str,
              report_uri: str | None = None, log=print) -> dict[str, Path]:
    """Run the KFP pipeline with ``kfp.local.SubprocessRunner``; returns stage -> stage folder
    (linked under ``<workdir>/runs/<run_id>/``, with the run's report card, whose curves come
    from MLflow at ``report_uri``)."""
    from kfp import local

    from coaflow import report
    from coaflow.orchestrate import k8s

    pipeline = build_pipeline(k8s.load())
    workdir = Path(workdir).resolve()
    root = workdir / "kfp" / run_id
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               workspace_root=str(root / "workspace"))
    log(f"run {run_id} on kfp.local ({root})")
    try:
        pipeline(profile=profile, overrides=list(overrides), seed=seed, workdir=str(workdir),
                 tracking_uri=os.environ.get(MLFLOW_ENV, ""), run_id=run_id)
    except RuntimeError as e:
        stage, code = failed_task(root)
        raise KfpTaskFailed(f"the KFP pipeline failed at {stage or 'a task'} (exit {code}): {e}",
                            code) from None
    finally:
        folders = link_results(root, workdir / "runs" / run_id)
        if folders:
            report.write(workdir / "runs" / run_id, report_uri)
    return folders


def link_results(root: Path, run_dir: Path) -> dict[str, Path]:
    """Symlink ``<root>/<pipeline run>/<stage>/result`` to ``<run_dir>/<stage>`` for every task
    that left a result folder."""
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name != "workspace"),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = {}
    for stage in contract.ORDER:
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
