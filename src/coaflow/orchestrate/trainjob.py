"""A training stage past one GPU box: the Kubeflow Trainer ``TrainJob`` that runs it.

``manifest("sft", args, settings, nodes=2, gpus_per_node=8)`` is the TrainJob
(``trainer.kubeflow.org/v1alpha1``) that runs the unchanged stage command on every node under
torchrun (``torchrun -m coaflow.launch stage sft ...``, see ``coaflow.launch``), on the
``torch-distributed`` ClusterTrainingRuntime: the runtime sets ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK`` and the master address, which torchrun reads. The
image, CPU/memory, secrets, MLflow ConfigMap, PVC, ``/dev/shm``, GPU node selector and
tolerations come from the same Kubernetes settings file as every other stage pod
(``coaflow.orchestrate.k8s``); the runtime's own pod template is patched through
``runtimePatches`` (the runtime's replicated job and container are both named ``node``).

``launch(...)`` is the launch step both engines run on the CPU image when a stage's config asks
for more than one GPU process (``sft.nodes`` x ``sft.gpus_per_node`` > 1, the same for rl): the
KFP task of that stage (``orchestrate.kfp``) and the Airflow task (``orchestrate.airflow``, a
pod running ``python -m coaflow.orchestrate.trainjob``). It puts the stage's folders on the
shared volume (a KFP artifact lives in the launcher pod, which the nodes cannot see: inputs are
copied onto the PVC, the stage folder is written there and copied back into the artifact),
submits the TrainJob through the kubernetes client's ``CustomObjectsApi``, polls its
conditions (``Complete`` / ``Failed``), prints rank 0's log as it grows and every node's log
tail at the end, and returns the stage's exit code: 0, or the failed rank's own code as
torchrun's error summary reports it (2 bad config, 75 retry, ...), else the node container's.

Checked here: the manifest against the Trainer's API models (``kubeflow-trainer-api`` 2.3.0,
the models of the Kubeflow SDK 0.5), and submit -> wait -> logs -> exit code against a fake API
(``tests/test_trainjob.py``). Not run here: a real Trainer (no cluster).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from coaflow.contract import MARKER, OWNER, RESULT, RUN_ID_ENV, read_result
from coaflow.errors import (
    EXIT_RETRY,
    CoaflowError,
    PipelineError,
    ServiceUnavailable,
    UserError,
    os_failure,
)
from coaflow.orchestrate.k8s import GPU_RESOURCE, KubernetesSettings
from coaflow.orchestrate.kube import api_errors, clients
from coaflow.orchestrate.kube import status as _status
from coaflow.section import ConfigError
from coaflow.tracking import redact

API_VERSION = "trainer.kubeflow.org/v1alpha1"
GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
NODE = "node"  # the torch runtime's replicated job and container
MANAGER = "coaflow"
MAX_RESTARTS = 3  # torchrun restarts every rank this often after a lost one (PET_MAX_RESTARTS)
# labels JobSet puts on the TrainJob's pods (the Kubeflow SDK lists them by the same ones)
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
LAUNCHED = ("sft", "rl")  # the stages whose config has nodes / gpus_per_node


def _env(ks: KubernetesSettings, run_id: str) -> list[dict]:
    env = [{"name": RUN_ID_ENV, "value": run_id}]
    env += [{"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key,
                                                            "optional": True}}}
            for s in ks.secrets]
    if ks.mlflow_configmap:  # env only (a TrainJob has no envFrom): the one key stages read
        env.append({"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {
            "name": ks.mlflow_configmap, "key": "MLFLOW_TRACKING_URI"}}})
    env.append({"name": "PET_MAX_RESTARTS", "value": str(MAX_RESTARTS)})  # torchrun's option
    return env


def manifest(stage: str, stage_args: Sequence[str], ks: KubernetesSettings, *, nodes: int,
             gpus_per_node: int, name: str, run_id: str = "",
             runtime: str = RUNTIME) -> dict:
    """The TrainJob of ``coaflow stage STAGE STAGE_ARGS...`` on ``nodes`` x ``gpus_per_node``
    (one process per GPU; the stage's batch size is per process)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"{stage}: nodes and gpus_per_node must be >= 1, got {nodes}, "
                          f"{gpus_per_node}")
    per_node = {**ks.node_resources(stage, gpus_per_node), GPU_RESOURCE: str(gpus_per_node)}
    pod = {
        "serviceAccountName": ks.service_account,
        "securityContext": {"runAsNonRoot": True, "runAsUser": ks.uid, "runAsGroup": ks.uid,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "nodeSelector": dict(ks.gpu_node_selector),
        "tolerations": [dict(t) for t in ks.gpu_tolerations],
        "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": ks.pvc}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                  "sizeLimit": ks.shm_size}}],
        "containers": [{
            "name": NODE,
            "securityContext": {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "work", "mountPath": ks.mount_path},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
        }],
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": ks.namespace,
                     "labels": {"app.kubernetes.io/name": "coaflow", "coaflow/stage": stage}},
        "spec": {
            "runtimeRef": {"name": runtime},
            "trainer": {
                "image": ks.images.gpu,
                "command": ["torchrun", "-m", "coaflow.launch", "stage", stage,
                            *stage_args],
                "env": _env(ks, run_id),
                "numNodes": nodes,
                "numProcPerNode": gpus_per_node,
                "resourcesPerNode": {"requests": dict(per_node), "limits": per_node},
            },
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": {"template": {
                "spec": {"replicatedJobs": [{"name": NODE, "template": {"spec": {
                    # no Istio sidecar (Kubeflow profile namespaces inject one): it would keep
                    # a finished node pod running and sit between the ranks' rendezvous
                    "template": {"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                                 "spec": pod}}}}]}}}}],
        },
    }


# --- which stages are launched, and how big ---------------------------------------------------

def placement(cfg, stage: str) -> tuple[int, int] | None:
    """``(nodes, gpus_per_node)`` when ``stage``'s config asks for more than one GPU process
    (a TrainJob), else None (one pod, one process, as every other stage)."""
    section = getattr(cfg, stage, None) if stage in LAUNCHED else None
    if section is None:
        return None
    size = (int(section.nodes), int(section.gpus_per_node))
    return size if size != (1, 1) else None


def job_name(run_id: str, stage: str, out: str) -> str:
    """A DNS-1035 name for the TrainJob of ``stage`` writing ``out``, short enough for JobSet's
    pod names (<= 40 characters). The same task retried gets the same name (and attaches to its
    job); another run, or a KFP run that reuses a run name, another (``out`` differs)."""
    digest = hashlib.sha1(f"{run_id}\0{out}".encode()).hexdigest()[:6]
    base = re.sub(r"[^a-z0-9-]+", "-", f"coaflow-{run_id}".lower()).strip("-")
    return f"{base[:40 - len(stage) - 8].rstrip('-')}-{digest}-{stage}"


# --- submit, wait, logs, exit code ------------------------------------------------------------

def state(job: Mapping[str, Any]) -> str:
    """``succeeded``, ``failed``, ``suspended`` or ``running`` (created, pods pending or up),
    from the TrainJob's conditions, as the Kubeflow SDK reads them."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    if "Complete" in conditions:
        return "succeeded"
    if "Failed" in conditions:
        return "failed"
    if "Suspended" in conditions:
        return "suspended"
    return "running"


def _message(job: Mapping[str, Any]) -> str:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason') or 'Failed'}: {c.get('message') or ''}".strip(": ")
    return ""


def submit(custom, job: Mapping[str, Any], log: Callable[[str], None] = print,
           sleep: Callable[[float], None] = time.sleep, gone_s: float = 300.0) -> None:
    """Create the TrainJob. One of the same name (the same run's stage: a retried task) that is
    still running is attached to; a finished one is deleted first, and submitted again (the
    stage resumes from its checkpoints on the shared volume)."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, dict(job))
        log(f"submitted TrainJob {ns}/{name}")
        return
    except Exception as e:  # noqa: BLE001 - kubernetes' ApiException; only a conflict is ours
        if _status(e) != 409:
            raise
    old = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    if state(old) in ("running", "suspended"):
        log(f"TrainJob {ns}/{name} exists and is not finished: waiting for it")
        return
    log(f"TrainJob {ns}/{name} exists and {state(old)}: deleting it and submitting again")
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    for _ in range(max(1, int(gone_s / 2.0))):  # counted, not timed: ``sleep`` is the clock
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except Exception as e:  # noqa: BLE001
            if _status(e) == 404:
                break
            raise
        sleep(2.0)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, dict(job))
    except Exception as e:  # noqa: BLE001
        if _status(e) != 409:
            raise
        raise ServiceUnavailable(f"TrainJob {ns}/{name}: deleted, but still there after "
                                 f"{gone_s:.0f} s (a finalizer?): retry later") from None
    log(f"submitted TrainJob {ns}/{name}")


def node_pods(core, namespace: str, name: str) -> list:
    """The TrainJob's node pods, rank 0's first."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"{JOBSET_LABEL}={name}").items
    return sorted(pods, key=lambda p: (int((p.metadata.labels or {}).get(INDEX_LABEL, 0)),
                                       p.metadata.name))


def pod_log(core, namespace: str, pod) -> str:
    try:
        return core.read_namespaced_pod_log(pod.metadata.name, namespace, container=NODE) or ""
    except Exception as e:  # noqa: BLE001 - a pod not started yet, or gone: no log is no error
        if _status(e) in (400, 404):
            return ""
        raise


ROOT_CAUSE = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.S)


def exit_code(pods: Sequence, logs: Mapping[str, str]) -> int:
    """The stage's exit code of a failed TrainJob: torchrun's error summary names the first
    failed rank's code (``Root Cause ... exitcode : 2``); without one, the first node container
    that ended non-zero; else 1 (a bug: read the logs)."""
    for pod in pods:
        m = ROOT_CAUSE.search(logs.get(pod.metadata.name, ""))
        if m:
            return int(m.group(1))
    for pod in pods:
        for st in (pod.status.container_statuses or []) if pod.status else []:
            term = st.state.terminated if st.name == NODE and st.state else None
            if term is not None and term.exit_code:
                return int(term.exit_code)
    return 1


class JobGone(ServiceUnavailable):
    """The TrainJob was deleted while it was waited on: worth a retry (it is submitted again)."""


def wait(custom, core, namespace: str, name: str, *, poll_s: float = 10.0,
         log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
         tail: int = 200) -> int:
    """Poll the TrainJob until it completes or fails, printing its state changes and rank 0's
    log as it grows; at the end every node's log tail. Returns the stage's exit code."""
    seen, shown = None, 0
    while True:
        try:
            job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as e:  # noqa: BLE001
            if _status(e) != 404:
                raise
            raise JobGone(f"TrainJob {namespace}/{name} was deleted while it ran "
                                     f"(last seen {seen or 'not yet'}): the stage did not "
                                     "finish; a retry submits it again") from None
        now = state(job)
        if now != seen:
            log(f"TrainJob {namespace}/{name}: {now}")
            seen = now
        pods = node_pods(core, namespace, name)
        if pods and now == "running":
            lines = pod_log(core, namespace, pods[0]).splitlines()
            for line in lines[shown:]:
                log(f"[{pods[0].metadata.name}] {line}")
            shown = max(shown, len(lines))
        if now in ("succeeded", "failed"):
            break
        sleep(poll_s)
    logs = {p.metadata.name: pod_log(core, namespace, p) for p in pods}
    for i, pod in enumerate(pods):
        lines = logs[pod.metadata.name].splitlines()
        lines = lines[shown:] if i == 0 else lines[-tail:]
        if lines:
            log(f"--- {pod.metadata.name} ({'rest' if i == 0 else f'last {len(lines)} lines'})")
            for line in lines:
                log(f"[{pod.metadata.name}] {line}")
    if now == "succeeded":
        return 0
    code = exit_code(pods, logs)
    if code < 0:  # a rank killed by a signal (lost node, OOM): exit(-9) would read as 247
        log(f"a rank was killed by signal {-code}: worth a retry")
        code = EXIT_RETRY
    log(f"TrainJob {namespace}/{name} failed ({_message(job) or 'no reason given'}): the stage "
        f"exits {code}")
    return code


# --- the launch step: folders on the shared volume, submit, wait ------------------------------

def _on_volume(path: str, mount: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(mount).resolve())


def _folders(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def check(stage: str, out: str, inputs: Mapping[str, str | Sequence[str]], nodes: int,
          gpus_per_node: int) -> None:
    """What the launch step checks before it copies or submits anything: the size, the input
    folders (completed stage folders), and ``out`` (absent, empty, or this stage's own folder:
    the rule of ``coaflow stage --out``; it is replaced when the job succeeds)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"{stage}: nodes and gpus_per_node must be >= 1, got {nodes}, "
                          f"{gpus_per_node}")
    for key, value in inputs.items():
        for folder in _folders(value):
            if not folder or read_result(Path(folder)) is None:
                raise PipelineError(f"--input {key}={folder}: not a completed stage folder (no "
                                    f"{RESULT} and {MARKER})")
    target = Path(out)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise PipelineError(f"--out {out}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        owner = target / OWNER
        if not owner.is_file() or owner.read_text().strip() != stage:
            raise PipelineError(f"--out {out}: holds files coaflow did not write for stage "
                                f"{stage!r} (no {OWNER} naming it): refusing to replace it")


def replace_folder(src: Path, dst: Path) -> None:
    """Make ``dst`` hold exactly ``src``'s files (never a merge with what was there), the
    completion marker last. ``dst`` is emptied, not removed: it may be a mount point."""
    tmp = dst.with_name(f".{dst.name}.copying")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp, symlinks=True, ignore=shutil.ignore_patterns(MARKER))
        dst.mkdir(parents=True, exist_ok=True)
        for child in list(dst.iterdir()):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        for child in list(tmp.iterdir()):
            shutil.move(str(child), str(dst / child.name))
        shutil.copy2(src / MARKER, dst / MARKER)
    except OSError as e:
        raise os_failure(e, f"copying the stage folder {src} to {dst}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def launch(stage: str, *, profile: str, out: str, inputs: Mapping[str, str | Sequence[str]],
           overrides: Sequence[str], run_id: str, ks: KubernetesSettings, nodes: int,
           gpus_per_node: int, apis=None, log: Callable[[str], None] = print,
           poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> int:
    """Run ``coaflow stage STAGE`` as a TrainJob and wait for it; returns its exit code. An
    error of the step itself (bad input, credentials, an API that does not answer) is one line
    on stderr and its exit code (2, 75), as ``coaflow stage`` gives them.

    The nodes see only the PVC (``ks.mount_path``): an input folder elsewhere (a KFP artifact in
    this pod) is copied to ``<mount>/runs/<run id>/.launch/<job name>/inputs/`` once every check
    passed and the API answered (and removed when the job has ended), and an ``out`` elsewhere is
    trained in ``<mount>/runs/<run id>/.launch/<job name>/<stage>`` and replaces ``out``'s
    contents when it succeeded."""
    try:
        return _launch(stage, profile=profile, out=out, inputs=inputs, overrides=overrides,
                       run_id=run_id, ks=ks, nodes=nodes, gpus_per_node=gpus_per_node,
                       apis=apis, log=log, poll_s=poll_s, sleep=sleep)
    except CoaflowError as e:
        print(f"Error: {redact(str(e))}", file=sys.stderr, flush=True)
        return e.exit_code


def _launch(stage: str, *, profile: str, out: str, inputs: Mapping[str, str | Sequence[str]],
            overrides: Sequence[str], run_id: str, ks: KubernetesSettings, nodes: int,
            gpus_per_node: int, apis, log: Callable[[str], None], poll_s: float,
            sleep: Callable[[float], None]) -> int:
    from coaflow.orchestrate.command import stage_argv

    check(stage, out, inputs, nodes, gpus_per_node)
    mount, run_id = ks.mount_path, run_id or "run"
    name = job_name(run_id, stage, out)
    staging = Path(mount) / "runs" / run_id / ".launch" / name
    custom, core = apis if apis is not None else clients()
    with api_errors(f"listing the pods of TrainJob {ks.namespace}/{name}", core):
        node_pods(core, ks.namespace, name)  # the API answers, and lets us in
    placed: dict[str, list[str]] = {}
    copied: list[Path] = []
    for key, value in inputs.items():
        for i, folder in enumerate(_folders(value)):
            if _on_volume(folder, mount):
                placed.setdefault(key, []).append(folder)
                continue
            dst = staging / "inputs" / (key if isinstance(value, str) else f"{key}-{i}")
            try:
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(folder, dst, symlinks=True)
            except OSError as e:
                raise os_failure(e, f"copying input {key}={folder} to {dst}") from None
            copied.append(dst)
            log(f"input {key}: {folder} -> {dst} (on the shared volume)")
            placed.setdefault(key, []).append(str(dst))
    work = out if _on_volume(out, mount) else str(staging / stage)
    argv = stage_argv(stage, profile=profile, out=work, inputs=placed, overrides=overrides,
                      run_id=run_id)
    job = manifest(stage, argv[3:], ks, nodes=nodes, gpus_per_node=gpus_per_node, name=name,
                   run_id=run_id)
    with api_errors(f"submitting TrainJob {ks.namespace}/{name}", custom):
        submit(custom, job, log=log, sleep=sleep)
    ended = False
    try:
        with api_errors(f"waiting for TrainJob {ks.namespace}/{name}", custom):
            code = wait(custom, core, ks.namespace, name, poll_s=poll_s, log=log, sleep=sleep)
        ended = True
    except JobGone:
        ended = True
        raise
    finally:  # once the job has ended its copies of the inputs are not read again
        for dst in copied if ended else []:
            shutil.rmtree(dst, ignore_errors=True)
    if code in (0, 4):  # 4: a refused promotion is a complete stage folder
        if read_result(Path(work)) is None:
            raise PipelineError(f"TrainJob {ks.namespace}/{name} ended with exit {code} but "
                                f"left no completed stage folder at {work}: do the nodes "
                                f"mount the volume at {mount} (pvc {ks.pvc})?")
        if work != out:
            replace_folder(Path(work), Path(out))
            log(f"stage folder {work} -> {out}")
    if code == 0:
        with api_errors(f"deleting TrainJob {ks.namespace}/{name}", custom):
            custom.delete_namespaced_custom_object(GROUP, VERSION, ks.namespace, PLURAL, name)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m coaflow.orchestrate.trainjob --nodes N --gpus-per-node G [--k8s-json JSON]
    -- coaflow stage NAME --config ... --out ... [--input S=DIR ...] [--set K=V ...]``: the
    launch step of an Airflow task; exits with the stage's code."""
    from coaflow.orchestrate import k8s
    from coaflow.orchestrate.command import _Parser, input_folders, parse

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m coaflow.orchestrate.trainjob --nodes N --gpus-per-node G "
              "[--k8s-json JSON] -- coaflow stage NAME ...", file=sys.stderr)
        return 2
    try:
        cut = argv.index("--")
        p = _Parser(prog="python -m coaflow.orchestrate.trainjob")
        p.add_argument("--nodes", type=int, required=True)
        p.add_argument("--gpus-per-node", type=int, required=True)
        p.add_argument("--k8s-json", help="the Kubernetes settings (default: the packaged file, "
                       "or $COAFLOW_K8S_CONFIG)")
        p.add_argument("--poll-s", type=float, default=10.0)
        opts = p.parse_args(argv[:cut])
        stage_cmd = argv[cut + 1:]
        if stage_cmd[:1] == ["coaflow"]:
            stage_cmd = stage_cmd[1:]
        args = parse(stage_cmd)
        ks = _settings(opts.k8s_json) if opts.k8s_json else k8s.load()
        inputs = input_folders(args.inputs)
    except CoaflowError as e:
        print(f"Error: {redact(str(e))}", file=sys.stderr, flush=True)
        return e.exit_code
    return launch(args.name, profile=args.config, out=args.out, inputs=inputs,
                  overrides=args.overrides, run_id=args.run_id or "run", ks=ks,
                  nodes=opts.nodes, gpus_per_node=opts.gpus_per_node, poll_s=opts.poll_s,
                  log=lambda line: print(line, flush=True))


def _settings(text: str) -> KubernetesSettings:
    """``--k8s-json``: the settings as JSON, one line naming what is wrong."""
    from pydantic import ValidationError

    from coaflow.orchestrate.k8s import invalid

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--k8s-json: not JSON ({e})") from None
    try:
        return KubernetesSettings.model_validate(data)
    except ValidationError as e:
        raise invalid("--k8s-json", e) from None


if __name__ == "__main__":
    sys.exit(main())
