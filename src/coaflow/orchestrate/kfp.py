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
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, List  # noqa: UP035 - List: KFP's list-of-artifacts annotation

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Output

from coaflow import contract
from coaflow.errors import EXIT_PROMOTION, EXIT_RETRY, CoaflowError
from coaflow.orchestrate.command import local, stage_argv
from coaflow.orchestrate.k8s import GPU_RESOURCE, KubernetesSettings

DONE, REFUSED = "done", "refused"
EXIT_FILE = "exit_code"  # left in a failed task's result folder
BACKOFF_S = 10.0  # first wait before retrying an exit 75; doubles each time


def _path(artifact: Any) -> Any:
    """An input artifact's local folder; a list (the shards of a fanned-out stage) of them."""
    if isinstance(artifact, list | tuple):
        return [_path(a) for a in artifact]
    return artifact.path if artifact is not None and hasattr(artifact, "path") else artifact


def run_component(stage: str, *, profile: str, overrides: Sequence[str], seed: int, workdir: str,
                  tracking_uri: str, retries: int, out: str, inputs: Mapping[str, Any],
                  run_id: str = "", metrics: Any = None, backoff_s: float = BACKOFF_S,
                  shard: int = -1, shape: Mapping[str, Any] | None = None,
                  launch: Mapping[str, Any] | None = None, site: Sequence[str] = ()) -> str:
    """Run ``stage`` as a KFP component; ``inputs`` maps stage -> input artifact (or None, or a
    list: a stage run in shards). ``shard`` >= 0: synthesize's slice; ``shape``: the shape the
    pipeline was compiled for, checked against the run's config first (exit 2 when they
    differ); ``launch`` (nodes, gpus_per_node, settings): run the stage as a Trainer TrainJob
    from here (``orchestrate.trainjob.launch``) instead of in this pod. ``site``: the
    cluster's overrides (``k8s.KubernetesSettings.overrides``), before the run's own.
    Returns ``"done"`` or ``"refused"``; exits with the stage's code on any other failure."""
    paths = {n: _path(a) for n, a in inputs.items()}
    overrides = [*site, *overrides, f"run.seed={seed}"] + ([f"run.workdir={workdir}"] if workdir else [])
    if shard >= 0:
        overrides.append(f"{stage}.shard={shard}")
    if shape:
        _check_shape(shape, profile, overrides)
    argv = local(stage_argv(stage, profile=profile, out=out, inputs=paths, overrides=overrides,
                            run_id=run_id or None))
    env = dict(os.environ, **({MLFLOW_ENV: tracking_uri} if tracking_uri else {}))
    for attempt in range(retries + 1):
        if launch:  # the nodes get MLflow's URI from the ConfigMap, or from this override
            code = _launch(stage, launch, profile=profile, out=out, inputs=paths,
                           overrides=overrides + ([f"tracking.uri={tracking_uri}"]
                                                  if tracking_uri else []),
                           run_id=run_id or os.environ.get(contract.RUN_ID_ENV, ""))
        else:
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
        for k, v in kfp_metrics(result.get("metrics", {})).items():
            metrics.log_metric(k, v)
    return REFUSED if code == EXIT_PROMOTION else DONE


def kfp_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A stage's numeric metrics as KFP's Metrics artifact can hold them: its metadata is a
    protobuf Struct, which has no NaN or infinity (kfp.local fails the whole run on one), so a
    metric with no value (an rl mean over no steps) is left out, as MLflow shows it absent.

    >>> kfp_metrics({"a": 1, "b": float("nan"), "c": True, "d": "x", "e": float("inf")})
    {'a': 1.0}
    """
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _check_shape(shape: Mapping[str, Any], profile: str, overrides: Sequence[str]) -> None:
    from coaflow.config import load_config
    from coaflow.errors import UserError
    from coaflow.orchestrate.shape import Shape, check

    try:
        check(Shape.from_json(dict(shape)), load_config(profile, list(overrides)),
              "recompile the pipeline for it (python -m components.coaflow_pipeline --profile "
              "PROFILE [--set KEY=VALUE ...]) or run a profile of this shape")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


def _launch(stage: str, launch: Mapping[str, Any], **kw) -> int:
    from coaflow.orchestrate import trainjob

    ks = KubernetesSettings.model_validate(launch["settings"])
    # the TrainJob goes where this pod runs (the KFP run's namespace: a Kubeflow profile's, or
    # standalone KFP's), whatever namespace the settings were compiled with: its PVC, Secret and
    # RBAC are there
    ks.namespace = os.environ.get(NAMESPACE_ENV) or ks.namespace
    return trainjob.launch(stage, ks=ks, nodes=int(launch["nodes"]),
                           gpus_per_node=int(launch["gpus_per_node"]),
                           log=lambda line: print(line, flush=True), **kw)


# --- the pipeline --------------------------------------------------------------------------------

UPSTREAM = contract.ORDER[:-1]  # the stages a task can read: every one but the last
MLFLOW_ENV = "MLFLOW_TRACKING_URI"  # the key of the MLflow ConfigMap every stage reads
RUN_NAME_FIELD = "metadata.annotations['pipelines.kubeflow.org/run_name']"
NAMESPACE_ENV = "COAFLOW_NAMESPACE"  # a launcher's own namespace (downward API)


def stage_task(stage: str, profile: str, overrides: list, seed: int, workdir: str,
               tracking_uri: str, run_id: str, retries: int, result: Output[Artifact],
               metrics: Output[Metrics], synthesize: Input[Artifact] = None,
               gate: Input[Artifact] = None, sft: Input[Artifact] = None,
               rl: Input[Artifact] = None, evaluate: Input[Artifact] = None,
               register: Input[Artifact] = None,
               synthesize_shards: Input[List[Artifact]] = None,  # noqa: UP006 - KFP reads it
               shard: int = -1, shape: dict = {}, launch: dict = {},  # noqa: B006
               site: list = []) -> str:  # noqa: B006
    """Run coaflow stage ``stage`` from the upstream stage folders its task is wired to (or, with
    ``launch``, as a Trainer TrainJob submitted and waited for from here)."""
    from coaflow.orchestrate.kfp import run_component

    upstream = {"synthesize": synthesize_shards or synthesize, "gate": gate, "sft": sft,
                "rl": rl, "evaluate": evaluate, "register": register}
    return run_component(stage, profile=profile, overrides=overrides, seed=seed,
                         workdir=workdir, tracking_uri=tracking_uri, run_id=run_id,
                         retries=retries, out=result.path, metrics=metrics,
                         inputs={n: a for n, a in upstream.items() if a is not None},
                         shard=shard, shape=shape, launch=launch, site=site)


def stage_component(name: str, image: str, component_name: str | None = None):
    """``stage_task`` as the component of stage ``name`` (its tasks are named after it)."""
    unknown = set(contract.reads(name)) - set(UPSTREAM)
    if unknown:
        raise ValueError(f"stage {name!r} reads {sorted(unknown)}: stage_task has no such input")
    component = dsl.component(stage_task, base_image=image, install_kfp_package=False)
    component.name = component.component_spec.name = component_name or name
    return component


def configure(task, name: str, ks: KubernetesSettings, launcher: bool = False) -> None:
    """Resources (requests = limits), caching and the Kubernetes settings of one stage task, as
    the Airflow DAG gives the same stage's pod; a ``launcher`` (a TrainJob's submitter) gets the
    launcher's resources and no GPU."""
    from kfp import kubernetes

    res = ks.launcher if launcher else ks.for_stage(name)
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
    # the KFP run's name, from the pod's annotation
    kubernetes.use_field_path_as_env(task, contract.RUN_ID_ENV, RUN_NAME_FIELD)
    if launcher:
        kubernetes.use_field_path_as_env(task, NAMESPACE_ENV, "metadata.namespace")


LAUNCH_PREFIX = "launch-"  # the component of a stage launched as a TrainJob: launch-sft


def build_pipeline(ks: KubernetesSettings, profile: str = "default",
                   overrides: Sequence[str] = ()):
    """The coaflow pipeline over every stage that exists, its tasks set up by ``ks``, shaped by
    the config ``profile`` + ``overrides`` (also the run parameters' defaults): with
    ``synthesize.shards`` > 1 synthesize fans out in a ``dsl.ParallelFor`` whose result folders
    the gate collects (``dsl.Collected``); a stage whose ``nodes`` x ``gpus_per_node`` > 1 runs
    a launcher (component ``launch-<stage>``, the CPU image) that submits and waits for its
    Trainer TrainJob. Every task of the first stage checks the run's config has that shape.
    Every task starts from the cluster's overrides (``ks.overrides``, from the install's values
    file), a constant of the compiled pipeline, so a run's own ``overrides`` cannot drop them."""
    from coaflow.config import load_config
    from coaflow.orchestrate.shape import SHARDED, Shape

    shape = Shape.of(load_config(profile, [*ks.overrides, *overrides]))
    stages = list(contract.ORDER)
    components = {n: stage_component(n, ks.images.cpu, LAUNCH_PREFIX + n)
                  if n in shape.launched else stage_component(n, ks.image_for(n))
                  for n in stages}
    # the launcher's TrainJob needs the pods' settings; the run's config it gets as argv
    settings = ks.model_dump(mode="json", exclude={"profile", "overrides"})

    @dsl.pipeline(name="coaflow", description="Chain-of-Agents training: " + " -> ".join(stages))
    def coaflow_pipeline(profile: str = profile, overrides: list = list(overrides),  # noqa: B006, B008
                         seed: int = 0, workdir: str = ks.mount_path, tracking_uri: str = "",
                         run_id: str = "", retries: int = 3):
        """``profile``: a profile name or a config file in the image; ``overrides``:
        SECTION.KEY=VALUE items as ``--set`` takes them; ``tracking_uri``: empty: the MLflow
        ConfigMap's (as Airflow's pods); ``run_id``: empty: the KFP run's name; ``retries``:
        attempts after an exit 75 (service unavailable)."""
        params = dict(profile=profile, overrides=overrides, seed=seed, workdir=workdir,
                      tracking_uri=tracking_uri, run_id=run_id, retries=retries)
        tasks, inputs_of = {}, {}
        with contextlib.ExitStack() as after_promotion:
            for i, name in enumerate(stages):
                inputs = {s: inputs_of[s] for s in contract.reads(name) if s in inputs_of}
                if SHARDED in inputs and shape.shards > 1:  # the fan-in: every shard's folder
                    inputs["synthesize_shards"] = inputs.pop(SHARDED)
                extra = {"shape": shape.to_json()} if i == 0 else {}
                if ks.overrides:
                    extra["site"] = list(ks.overrides)
                if name in shape.launched:
                    nodes, gpus = shape.launched[name]
                    extra["launch"] = {"nodes": nodes, "gpus_per_node": gpus,
                                       "settings": settings}
                if name == SHARDED and shape.shards > 1:
                    with dsl.ParallelFor(items=list(range(shape.shards)),
                                         name=f"{name}-shards") as shard:
                        tasks[name] = components[name](stage=name, shard=shard, **params,
                                                       **inputs, **extra)
                        configure(tasks[name], name, ks)
                    inputs_of[name] = dsl.Collected(tasks[name].outputs["result"])
                else:
                    tasks[name] = components[name](stage=name, **params, **inputs, **extra)
                    configure(tasks[name], name, ks, launcher=name in shape.launched)
                    inputs_of[name] = tasks[name].outputs["result"]
                if name == contract.PROMOTION:
                    after_promotion.enter_context(
                        dsl.If(tasks[name].outputs["Output"] != REFUSED, name="promoted"))

    return coaflow_pipeline


def compile_pipeline(path: str | Path, ks: KubernetesSettings, profile: str = "default",
                     overrides: Sequence[str] = ()) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(ks, profile, overrides), str(path))
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

    # shaped by this run's config; the cluster's overrides (deploy to its serving Deployment,
    # its teacher) do not apply to a run on this machine
    ks = k8s.load().model_copy(update={"overrides": [], "profile": None})
    pipeline = build_pipeline(ks, profile, overrides)
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
    that left a result folder (shard i of a fanned-out stage: ``<run_dir>/<stage>-<i>``)."""
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name != "workspace"),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = {}
    for stage in contract.ORDER:
        found = {stage: runs[-1] / stage / "result"}
        # a fanned-out stage: one result per ParallelFor iteration -> <stage>-<i>, as Airflow's
        for it in runs[-1].glob(f"for-loop-*-iteration-*/{stage}/result"):
            found[f"{stage}-{it.parent.parent.name.rsplit('-', 1)[1]}"] = it
        for name, src in sorted(found.items()):
            if src.is_dir():
                dst = run_dir / name
                if dst.is_symlink():
                    dst.unlink()
                if not dst.exists():
                    dst.symlink_to(src)
                folders[name] = src
    return folders


def failed_task(root: Path) -> tuple[str | None, int]:
    """(stage, exit code) of the task that failed in the newest pipeline run under ``root``."""
    markers = sorted(root.glob(f"*/*/result/{EXIT_FILE}"), key=lambda p: p.stat().st_mtime)
    if not markers:
        return None, 1
    return markers[-1].parent.parent.name, int(markers[-1].read_text())
