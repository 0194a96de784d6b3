"""What the Airflow DAG ``dags/coaflow_retrain.py`` needs, kept out of the DAG file.

The DAG file only wires tasks; everything that can be written and tested without a scheduler lives
here and imports no Airflow at module level:

- ``Settings``: the DAG's own config (``dags/coaflow_retrain.yaml``; ``COAFLOW_AIRFLOW_*`` env vars
  win): schedule, mode, where stage folders live, retries, and the Kubernetes pod settings.
- ``trigger_params`` / ``overrides_from_params``: the trigger form (one entry per knob people
  change between runs) and its translation into ``--set section.key=value`` overrides, checked
  against the real config model so a bad value fails the run's first task with one clear line.
- ``task_argv``: the one command every task runs (``orchestrate.command``), with
  ``--out <workdir>/runs/<run id>/NAME``, in a subprocess on the worker (``local`` mode) or as a
  Kubernetes pod in the coaflow image (``kubernetes`` mode).
- ``outcome``: the exit code -> what Airflow does (75 retries; 2, 3 and bugs fail without retries;
  4, a refused promotion, is a decision and the task succeeds with ``promoted: false``).
- ``run_local`` (local mode) and ``record_failure`` (the failure callback). Kubernetes mode, the
  pod of each stage task: ``orchestrate.airflow_pods``.

Tasks pass paths and ``result.json`` through XCom, never data.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coaflow import contract
from coaflow.errors import (
    EXIT_OK,
    EXIT_PROMOTION,
    RETRYABLE_EXIT_CODES,
    UserError,
    exit_meaning,
)
from coaflow.orchestrate import k8s
from coaflow.orchestrate.command import local, stage_argv
from coaflow.orchestrate.k8s import KubernetesSettings, PodResources, SecretEnv
from coaflow.orchestrate.shape import Shape, check, of_profile

__all__ = ["KubernetesSettings", "PodResources", "SecretEnv", "Settings", "load_settings", "plan",
           "task_argv", "outcome"]

# The DAG passes the file beside itself (in the image: /opt/airflow/dags/); this default is the
# source tree's, for tests and an editable install.
DEFAULT_SETTINGS = Path(__file__).resolve().parents[3] / "dags" / "coaflow_retrain.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Settings(_Strict):
    schedule: str | None = Field("@weekly", description="cron or preset; null: only triggered")
    mode: Literal["local", "kubernetes"] = "local"
    profile: str = Field("default", description="default profile of the trigger form")
    workdir: str = Field("~/coaflow-airflow", description="local mode: run.workdir (stage folders "
                         "under runs/<airflow run id>/)")
    python: str | None = Field(None, description="local mode: interpreter for `-m coaflow.cli`; "
                               "null: the worker's own")
    owner: str = "mlops"
    tags: list[str] = Field(default_factory=lambda: ["coaflow", "training"])
    retries: int = Field(3, ge=0, description="retries, only for exit 75 (service unavailable)")
    retry_delay_s: int = Field(60, ge=1)
    max_retry_delay_s: int = Field(1800, ge=1)
    kubernetes_file: str | None = Field(None, description="the pods' Kubernetes settings, shared "
                                        "with the Kubeflow pipeline; null: coaflow's packaged "
                                        "k8s.yaml ($COAFLOW_K8S_CONFIG wins)")
    kubernetes: KubernetesSettings

    @property
    def run_workdir(self) -> str:
        """``run.workdir`` of the stages: the PVC's mount in kubernetes mode."""
        if self.mode == "kubernetes":
            return self.kubernetes.mount_path
        return str(Path(self.workdir).expanduser())


ENV = {"COAFLOW_AIRFLOW_MODE": "mode", "COAFLOW_AIRFLOW_SCHEDULE": "schedule",
       "COAFLOW_AIRFLOW_WORKDIR": "workdir", "COAFLOW_AIRFLOW_PROFILE": "profile"}


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                  default: str | Path = DEFAULT_SETTINGS) -> Settings:
    """``path`` (else ``$COAFLOW_AIRFLOW_CONFIG``, else ``default``: the DAG passes the file
    beside itself), then the ``COAFLOW_AIRFLOW_*`` env vars; a schedule of ``none`` means
    trigger-only. The pods' settings come from the one Kubernetes settings file
    (``coaflow.orchestrate.k8s``). A missing file is an error naming its path, never a silent
    fallback to defaults (a GPU stage would get no GPU)."""
    env = os.environ if env is None else env
    path = Path(path or env.get("COAFLOW_AIRFLOW_CONFIG") or default)
    if not path.is_file():
        raise UserError(f"{path}: the DAG's settings file is missing (ship it beside the DAG "
                        "file, or set COAFLOW_AIRFLOW_CONFIG)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if "kubernetes" in data:
        raise UserError(f"{path}: kubernetes: the pod settings moved to one file both engines "
                        f"read ({k8s.PACKAGED.name}); name yours with kubernetes_file")
    for var, key in ENV.items():
        if env.get(var):
            data[key] = env[var]
    if str(data.get("schedule")).lower() in ("none", "null", ""):
        data["schedule"] = None
    k8s_file = env.get(k8s.ENV_VAR) or data.get("kubernetes_file")
    if k8s_file and not Path(k8s_file).is_absolute():
        k8s_file = path.parent / k8s_file  # relative to the DAG's settings file
    data["kubernetes"] = k8s.load(k8s_file, env).model_dump()
    if data["kubernetes"]["profile"] and not env.get("COAFLOW_AIRFLOW_PROFILE"):
        data["profile"] = data["kubernetes"]["profile"]  # the install's values file names it
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise k8s.invalid(path, e) from None


# --- the trigger form ----------------------------------------------------------------------

# param -> (config key, the stage that must exist for it to mean anything, JSON schema, doc)
PARAMS: dict[str, tuple[str | None, str | None, dict, str]] = {
    "seed": ("run.seed", None, {"type": ["null", "integer"]},
             "seed for data, sampling and training (empty: the profile's)"),
    "base_model": ("sft.model", "sft", {"type": ["null", "string"]},
                   "student to fine-tune: smollm2-135m-instruct (from PyPI), 'tiny', a hub id "
                   "or a model folder (empty: the profile's)"),
    "teacher": ("synthesize.teacher", "synthesize",
                {"type": ["null", "string"], "enum": [None, "scripted", "llm"],
                 # the UI labels a null choice "null" unless told otherwise
                 "values_display": {"null": "(the profile's)", "scripted": "scripted",
                                    "llm": "llm"}},
                "scripted: the offline team; llm: the same roles over an OpenAI-compatible API"),
    "teacher_base_url": ("synthesize.llm.base_url", "synthesize", {"type": ["null", "string"]},
                         "teacher endpoint for teacher=llm, e.g. http://vllm:8000/v1"),
    "teacher_model": ("synthesize.llm.model", "synthesize", {"type": ["null", "string"]},
                      "teacher model name served at the endpoint"),
    "tasks_per_suite": ("synthesize.suites", "synthesize",
                        {"type": ["null", "object"], "additionalProperties": {"type": "integer",
                                                                              "minimum": 0}},
                        'tasks per suite, e.g. {"kbqa": 1000, "calc": 200} (empty: the profile\'s)'),
    "epochs": ("sft.epochs", "sft", {"type": ["null", "number"], "exclusiveMinimum": 0},
               "SFT passes over the data (empty: the profile's)"),
    "promote": ("register.promote", "register", {"type": "boolean"},
                "move the champion alias when the candidate passes the promotion rules"),
    "deploy_target": ("deploy.target", "deploy",
                      {"type": "string", "enum": ["local", "kubernetes", "none"]},
                      "where deploy rolls out the champion"),
}
# tasks_per_suite: {} (not null), because the UI's JSON field shows {} for null and would send
# null while showing {}; an empty object means the profile's, like null.
DEFAULTS: dict[str, Any] = {"promote": True, "deploy_target": "none", "tasks_per_suite": {}}


def shipped_profiles() -> list[str]:
    """The profile names coaflow ships (``src/coaflow/configs/*.yaml``)."""
    from coaflow.config import PROFILE_DIR

    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def trigger_params(settings: Settings, stages: Sequence[str]) -> dict[str, dict]:
    """Param name -> {default, schema, description} for the DAG's trigger form: ``profile``,
    ``overrides`` and every knob whose stage exists."""
    profiles = shipped_profiles()
    if settings.profile not in profiles:  # a site's own profile file, set in the DAG settings
        profiles.append(settings.profile)
    form = {
        "profile": {"default": settings.profile, "schema": {"type": "string", "enum": profiles},
                    "description": "a profile coaflow ships (src/coaflow/configs), or the one "
                                   "the DAG's settings name"},
    }
    # a form default that would undo one of the cluster's overrides (deploy_target: none) is
    # the cluster's value instead
    site = dict(o.split("=", 1) for o in site_overrides(settings))
    for name, (key, stage, schema, doc) in PARAMS.items():
        if stage is None or stage in stages:
            default = site.get(key, DEFAULTS.get(name)) if name in DEFAULTS else None
            form[name] = {"default": default, "schema": schema, "description": doc}
    form["overrides"] = {"default": [], "schema": {"type": ["null", "array"],  # null: optional
                                                   "items": {"type": "string"}},
                         "description": "more config overrides, one section.key=value each "
                                        "(as coaflow --set), e.g. sft.lr=0.001"}
    return form


def overrides_from_params(params: Mapping[str, Any], stages: Sequence[str]) -> list[str]:
    """``--set`` overrides for the trigger form's values (empty values keep the profile's)."""
    out = []
    for name, (key, stage, _schema, _doc) in PARAMS.items():
        value = params.get(name)
        if value in (None, "", {}) or (stage is not None and stage not in stages):
            continue
        out.append(f"{key}={json.dumps(value)}")  # JSON is YAML: 'a', 3, {"kbqa": 2}, true
    extra = params.get("overrides") or []
    if isinstance(extra, str):
        extra = [line for line in extra.splitlines() if line.strip()]
    for item in extra:
        if not isinstance(item, str) or "=" not in item:
            raise UserError(f"param overrides: {item!r} is not section.key=value")
        out.append(item.strip())
    return out


def safe_run_id(airflow_run_id: str) -> str:
    """An Airflow run id (``manual__2026-11-30T20:40:00.1+00:00``) as a folder name and MLflow
    tag: ``manual__2026-11-30T20-40-00.1-00-00``.

    >>> safe_run_id("scheduled__2026-11-30T00:00:00+00:00")
    'scheduled__2026-11-30T00-00-00-00-00'
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "-", airflow_run_id).strip("-.") or "run"


def plan(params: Mapping[str, Any], airflow_run_id: str, settings: Settings,
         stages: Sequence[str]) -> dict[str, Any]:
    """Check the trigger form's values against the config model and return what every stage
    task needs: the profile, the overrides, the coaflow run id and the run's folder. A bad value
    is a ``UserError`` naming the field (the run fails at its first task, before any work)."""
    from coaflow.config import load_config

    profile = str(params.get("profile") or settings.profile)
    overrides = [f"run.workdir={settings.run_workdir}", *site_overrides(settings),
                 *overrides_from_params(params, stages)]
    cfg = load_config(profile, overrides)
    check(dag_shape(settings), cfg, f"the DAG was parsed for its settings' profile "
          f"{settings.profile!r}: set the DAG's profile (COAFLOW_AIRFLOW_PROFILE) to one of this "
          "shape, or trigger a run of the DAG's shape")
    run_id = safe_run_id(airflow_run_id)
    run_dir = Path(cfg.run.workdir).expanduser()
    if not run_dir.is_absolute() and settings.mode == "local":
        run_dir = run_dir.resolve()
    return {"profile": profile, "overrides": overrides, "run_id": run_id,
            "run_dir": str(run_dir / "runs" / run_id), "shape": Shape.of(cfg).to_json()}


def dag_shape(settings: Settings) -> Shape:
    """The graph's shape, from the settings' profile when the DAG is parsed: synthesize mapped
    over ``synthesize.shards`` workers, sft / rl past one GPU process as a TrainJob launcher."""
    return of_profile(settings.profile, site_overrides(settings))


def site_overrides(settings: Settings) -> list[str]:
    """The cluster's overrides (from the install's values file: the model name, the serving
    Deployment, the teacher), for the pods of kubernetes mode; none in local mode."""
    return list(settings.kubernetes.overrides) if settings.mode == "kubernetes" else []


def task_out(stage: str, the_plan: Mapping[str, Any], shard: int | None = None) -> str:
    """The stage folder of a task: ``<run dir>/NAME``; shard i of synthesize: ``NAME-i``."""
    return f"{the_plan['run_dir']}/{stage}" + (f"-{shard}" if shard is not None else "")


def task_argv(stage: str, the_plan: Mapping[str, Any], inputs: Mapping[str, Any],
              shard: int | None = None) -> list[str]:
    """``coaflow stage`` for one stage of a planned run: the argv of both modes."""
    overrides = list(the_plan["overrides"]) + ([f"{stage}.shard={shard}"] if shard is not None
                                               else [])
    return stage_argv(stage, profile=the_plan["profile"], out=task_out(stage, the_plan, shard),
                      inputs=inputs, overrides=overrides, run_id=the_plan["run_id"])


def launched(stage: str, the_plan: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(nodes, gpus_per_node)`` when the planned run launches ``stage`` as a TrainJob."""
    size = Shape.from_json(the_plan.get("shape") or {}).launched.get(stage)
    return tuple(size) if size else None


def command_argv(stage: str, the_plan: Mapping[str, Any], inputs: Mapping[str, Any],
                 ks: KubernetesSettings | None = None, shard: int | None = None,
                 python: str = "python") -> list[str]:
    """What a task runs: the stage argv, or for a launched stage the TrainJob launcher in front
    of it (``python -m coaflow.orchestrate.trainjob ... -- coaflow stage ...``), which submits
    the same argv to every node and exits with the stage's code."""
    argv = task_argv(stage, the_plan, inputs, shard)
    size = launched(stage, the_plan)
    if size is None:
        return argv
    return [python, "-m", "coaflow.orchestrate.trainjob", "--nodes", str(size[0]),
            "--gpus-per-node", str(size[1]), "--k8s-json", (ks or k8s.load()).model_dump_json(),
            "--", *argv]


def stage_inputs(stage: str, done: Mapping[str, Any]) -> dict[str, Any]:
    """Input folders for ``stage`` from its upstream tasks' XComs (``None``: skipped or absent;
    a sequence: the XComs of a mapped task, one folder per shard): every NEEDS and the
    OPTIONAL stages that ran."""
    out: dict[str, Any] = {}
    for n in contract.reads(stage):
        value = done.get(n)
        if isinstance(value, Mapping):
            out[n] = value["dir"]
        elif value:  # a mapped task: its XComs in map index order
            out[n] = [x["dir"] for x in value if x]
    return out


# --- exit codes -> what Airflow does -------------------------------------------------------

def outcome(code: int) -> Literal["ok", "refused", "retry", "fail"]:
    """What the task does with ``coaflow stage``'s exit code.

    >>> [outcome(c) for c in (0, 4, 75, 2, 3, 1, -9)]
    ['ok', 'refused', 'retry', 'fail', 'fail', 'fail', 'retry']
    """
    if code == EXIT_OK:
        return "ok"
    if code == EXIT_PROMOTION:
        return "refused"
    if code in RETRYABLE_EXIT_CODES or code < 0:  # < 0: killed by a signal (OOM, eviction)
        return "retry"
    return "fail"


def xcom_value(stage: str, out_dir: str | Path, code: int = 0) -> dict[str, Any]:
    """What a stage task returns: its folder, its ``result.json`` and whether it promoted."""
    out = Path(out_dir)
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    result = _finite(result)  # XCom is strict JSON: a NaN metric (no held-out data) is null
    return {"stage": stage, "dir": str(out), "exit_code": code, "result": result,
            "promoted": (code != EXIT_PROMOTION
                         and bool(result.get("summary", {}).get("promoted", True)))}


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None.

    >>> _finite({"a": [1.5, float("nan")], "b": float("inf")})
    {'a': [1.5, None], 'b': None}
    """
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def raise_for(stage: str, code: int, tail: str = "") -> None:
    """Raise what Airflow acts on for a failed exit code: a plain exception is retried, an
    ``AirflowFailException`` is not."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    what = f"killed by signal {-code}" if code < 0 else exit_meaning(code)
    msg = f"stage {stage} exited {code} ({what})" + (f": {tail}" if tail else "")
    if outcome(code) == "retry":
        raise AirflowException(msg)
    raise AirflowFailException(msg)


def run_local(stage: str, the_plan: Mapping[str, Any], inputs: Mapping[str, Any],
              python: str | None = None, shard: int | None = None,
              ks: KubernetesSettings | None = None) -> dict[str, Any]:
    """Run the stage's argv in a subprocess on this worker (output streamed to the task log);
    return its XCom, or raise what Airflow retries / fails on. A launched stage runs the
    TrainJob launcher here instead (it needs the worker to reach a cluster)."""
    argv = task_argv(stage, the_plan, inputs, shard)
    cmd = local(argv, python)
    if launched(stage, the_plan):
        argv = command_argv(stage, the_plan, inputs, ks, shard, python or sys.executable)
        cmd = argv
    print("+ " + shlex.join(argv), flush=True)
    env = {**os.environ, contract.RUN_ID_ENV: the_plan["run_id"], "PYTHONUNBUFFERED": "1"}
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, bufsize=1) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-5:]
        code = proc.wait()
    if outcome(code) in ("ok", "refused"):
        return xcom_value(stage, task_out(stage, the_plan, shard), code)
    raise_for(stage, code, " | ".join(x for x in tail if x)[-500:])
    return {}  # unreachable: raise_for always raises


def record_failure(context: Mapping[str, Any]) -> None:
    """Airflow ``on_failure_callback``: tag the run's MLflow parent run with the failed stage and
    the error. Never raises (a callback must not hide the task's own failure)."""
    try:
        from coaflow.config import load_config
        from coaflow.tracking import Tracker

        ti = context["ti"]
        the_plan = ti.xcom_pull(task_ids="configure") or {}
        if not the_plan:
            return
        cfg = load_config(the_plan["profile"], the_plan["overrides"])
        tracker = Tracker(cfg.run.workdir, uri=cfg.tracking.uri, enabled=cfg.tracking.enabled,
                          experiment=cfg.tracking.experiment or cfg.run.name)
        error = str(context.get("exception") or "")[:500]
        with tracker.pipeline_run(the_plan["run_id"]):
            tracker.set_tags({"coaflow.status": "failed", "coaflow.failed_stage": ti.task_id,
                              "coaflow.error": error,
                              "airflow.run_id": context.get("run_id") or ""})
    except Exception as e:  # noqa: BLE001
        print(f"(failure not recorded in MLflow: {type(e).__name__}: {e})")


def pull_inputs(ti, stage: str, task_ids) -> dict[str, Any]:
    """Input folders for ``stage`` from the XComs of the stage tasks it reads (``ti``: the
    running task instance; a skipped or absent stage is left out; a mapped one gives a list)."""
    return stage_inputs(stage, {n: ti.xcom_pull(task_ids=n) for n in task_ids
                                if n in contract.ORDER and n != stage})
