"""The Airflow DAG's kubernetes mode: each stage task a ``KubernetesPodOperator`` whose pod runs
the stage's ``coaflow stage`` argv (``orchestrate.airflow``'s plan) in the coaflow image, as the
images' non-root user, with the pod settings both engines read (``orchestrate.k8s``), and hands
its ``result.json`` on as XCom. Imports no Airflow at module level.

    python -m coaflow.orchestrate.airflow_pods xcom STAGE DIR RC   # in the pod: the XCom
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from coaflow import contract
from coaflow.errors import EXIT_OK, EXIT_PROMOTION, EXIT_USER, exit_meaning
from coaflow.orchestrate.airflow import (
    Settings,
    command_argv,
    outcome,
    pull_inputs,
    task_out,
    xcom_value,
)
from coaflow.orchestrate.k8s import GPU_RESOURCE, KubernetesSettings
from coaflow.orchestrate.shape import SHARDED, Shape

XCOM_FILE = "/airflow/xcom/return.json"  # where KubernetesPodOperator's sidecar reads the XCom


def pod_command(stage: str, the_plan: Mapping[str, Any], inputs: Mapping[str, Any],
                shard: int | None = None, ks: KubernetesSettings | None = None) -> list[str]:
    """The pod's command: the stage argv (or, for a launched stage, the TrainJob launcher with
    it), then its XCom for the sidecar; a refused promotion (4) exits 0 so the branch after it
    decides, every other code is the stage's own."""
    out = task_out(stage, the_plan, shard)
    argv = command_argv(stage, the_plan, inputs, ks, shard)
    script = (f"{shlex.join(argv)}; rc=$?; "
              f"mkdir -p {Path(XCOM_FILE).parent} && python -m coaflow.orchestrate.airflow_pods xcom "
              f"{shlex.quote(stage)} {shlex.quote(out)} $rc > {XCOM_FILE}; "
              f"if [ $rc -eq {EXIT_PROMOTION} ]; then exit 0; fi; exit $rc")
    return ["/bin/sh", "-c", script]


def container_security(uid: int | None = None):
    """What Pod Security "restricted" asks of a container: no privilege escalation, every
    capability dropped, the runtime's seccomp profile, a non-root user (``uid``)."""
    from kubernetes.client import models as km

    return km.V1SecurityContext(
        allow_privilege_escalation=False, capabilities=km.V1Capabilities(drop=["ALL"]),
        seccomp_profile=km.V1SeccompProfile(type="RuntimeDefault"), run_as_non_root=True,
        run_as_user=uid, run_as_group=uid)


def pod_args(stage: str, settings: Settings, launcher: bool = False) -> dict[str, Any]:
    """The stage's pod as ``KubernetesPodOperator``'s documented arguments: the stage's image
    (GPU stages the GPU image, the rest the CPU one), as the images' non-root user under Pod
    Security "restricted", with the run's PVC, the secrets as env (optional: a Secret not
    created yet does not keep the pod from starting), the MLflow ConfigMap and, for GPU stages,
    GPU limits, tolerations, a node selector and a RAM-backed /dev/shm. Every value comes from
    the Kubernetes settings file the Kubeflow pipeline reads too. A ``launcher`` (the pod that
    submits a stage's TrainJob) is a CPU pod with the launcher's resources. The command and the
    run id are the run's: ``run_args``."""
    from kubernetes.client import models as km

    ks = settings.kubernetes
    res = ks.launcher if launcher else ks.for_stage(stage)
    limits = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        limits[GPU_RESOURCE] = str(res.gpus)
    mounts = [km.V1VolumeMount(name="work", mount_path=ks.mount_path)]
    volumes = [km.V1Volume(name="work", persistent_volume_claim=(
        km.V1PersistentVolumeClaimVolumeSource(claim_name=ks.pvc)))]
    if res.gpus:
        mounts.append(km.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
        volumes.append(km.V1Volume(name="dshm", empty_dir=km.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=ks.shm_size)))
    return dict(
        namespace=ks.namespace, image=ks.images.cpu if launcher else ks.image_for(stage),
        image_pull_policy=ks.image_pull_policy,
        labels={"app.kubernetes.io/name": "coaflow", "coaflow/stage": stage},
        env_vars=[km.V1EnvVar(name=s.env, value_from=km.V1EnvVarSource(
            secret_key_ref=km.V1SecretKeySelector(name=s.secret, key=s.key, optional=True)))
            for s in ks.secrets],
        env_from=[km.V1EnvFromSource(config_map_ref=km.V1ConfigMapEnvSource(
            name=ks.mlflow_configmap))] if ks.mlflow_configmap else None,
        volumes=volumes, volume_mounts=mounts,
        container_resources=km.V1ResourceRequirements(requests=dict(limits), limits=limits),
        tolerations=[km.V1Toleration(**t) for t in ks.gpu_tolerations] if res.gpus else None,
        node_selector=dict(ks.gpu_node_selector) if res.gpus and ks.gpu_node_selector else None,
        service_account_name=ks.service_account,
        security_context=km.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=ks.uid, run_as_group=ks.uid,
            seccomp_profile=km.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=container_security(ks.uid))


def run_args(command: Sequence[str], run_id: str, env_vars: Sequence) -> dict[str, Any]:
    """The run's part of the pod: its command and ``$COAFLOW_RUN_ID`` before the stage's env."""
    from kubernetes.client import models as km

    return dict(cmds=list(command), arguments=[],
                env_vars=[km.V1EnvVar(name=contract.RUN_ID_ENV, value=run_id), *env_vars])


def pod_spec(stage: str, settings: Settings, command: Sequence[str], run_id: str = "",
             launcher: bool = False):
    """The ``V1Pod`` the operator sends for these arguments (before it adds its XCom sidecar):
    the base container (the operator's ``base``) and the pod around it, built from the same
    ``pod_args`` and ``run_args`` (tests/dags/test_dag.py compares it with the operator's own
    rendering), for the checks that need no Airflow."""
    from kubernetes.client import models as km

    a = pod_args(stage, settings, launcher)
    run = run_args(command, run_id, a["env_vars"])
    container = km.V1Container(
        name="base", image=a["image"], image_pull_policy=a["image_pull_policy"],
        command=run["cmds"], env=run["env_vars"], env_from=a["env_from"],
        volume_mounts=a["volume_mounts"], resources=a["container_resources"],
        security_context=a["container_security_context"])
    return km.V1Pod(
        api_version="v1", kind="Pod",
        metadata=km.V1ObjectMeta(namespace=a["namespace"], labels=a["labels"]),
        spec=km.V1PodSpec(
            containers=[container], volumes=a["volumes"], restart_policy="Never",
            service_account_name=a["service_account_name"], tolerations=a["tolerations"],
            security_context=a["security_context"], node_selector=a["node_selector"]))


def harden_sidecar(pod, image: str, uid: int | None):
    """The provider's XCom sidecar as the base container: a pinned ``image`` (its default is an
    untagged ``alpine``), the restricted security context, a memory limit. (The provider has no
    argument for the sidecar's security context: this runs as its documented
    ``on_pod_manifest_created`` callback.)"""
    from kubernetes.client import models as km

    for c in pod.spec.containers:
        if c.name == "airflow-xcom-sidecar":
            c.image = image
            c.security_context = container_security(uid)
            c.resources = km.V1ResourceRequirements(requests={"cpu": "1m", "memory": "10Mi"},
                                                     limits={"memory": "32Mi"})
    return pod


@functools.cache
def operator_class():
    """``CoaflowPodOperator`` (defined on first use: the provider loads only in kubernetes
    mode). The pod is ``KubernetesPodOperator``'s from its documented arguments (``pod_args``);
    at run time ``execute`` sets the run's command and run id (``run_args``), the XCom sidecar
    is hardened in the documented ``on_pod_manifest_created`` callback, and ``cleanup`` turns a
    non-retryable exit code (2, 3, a bug) into ``AirflowFailException``: the provider retries
    every failed pod and has no option for exit codes that a retry cannot fix."""
    from airflow.providers.cncf.kubernetes.callbacks import KubernetesPodOperatorCallback
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    class HardenedSidecar(KubernetesPodOperatorCallback):
        @staticmethod
        def on_pod_manifest_created(*, pod_request, operator, **_):
            harden_sidecar(pod_request, operator.k8s.xcom_sidecar_image, operator.k8s.uid)

    class CoaflowPodOperator(KubernetesPodOperator):
        def __init__(self, *, k8s_json: str, shard: int | None = None, **kwargs):
            super().__init__(callbacks=[HardenedSidecar], **kwargs)
            self.k8s_json, self.shard = k8s_json, shard

        @property
        def k8s(self) -> KubernetesSettings:
            return KubernetesSettings.model_validate_json(self.k8s_json)

        def execute(self, context):
            ti = context["ti"]
            the_plan = ti.xcom_pull(task_ids="configure")
            inputs = pull_inputs(ti, self.task_id, self.dag.task_ids)
            command = pod_command(self.task_id, the_plan, inputs, self.shard, self.k8s)
            for key, value in run_args(command, the_plan["run_id"], self.env_vars).items():
                setattr(self, key, value)
            return super().execute(context)

        def cleanup(self, pod, remote_pod):
            try:
                super().cleanup(pod, remote_pod)
            except AirflowException as e:
                if isinstance(e, AirflowFailException) or type(e).__name__ == "AirflowSkipException":
                    raise
                code = container_exit_code(remote_pod)
                if code is not None and outcome(code) == "fail":
                    raise AirflowFailException(
                        f"stage {self.task_id} exited {code} ({exit_meaning(code)})") from e
                raise

    return CoaflowPodOperator


def pod_operator(stage: str, settings: Settings, shape: Shape | None = None):
    """The task of ``stage`` in kubernetes mode (``operator_class``). With ``shape`` (the DAG's):
    synthesize is mapped over its shards (``.expand(shard=...)``), and a launched stage's pod is
    the TrainJob launcher on the CPU image."""
    shape = shape or Shape()
    launcher = stage in shape.launched
    ks = settings.kubernetes
    args = dict(
        task_id=stage, name=f"coaflow-{'launch-' if launcher else ''}{stage}",
        k8s_json=ks.model_dump_json(), **pod_args(stage, settings, launcher),
        kubernetes_conn_id=ks.kubernetes_conn_id, in_cluster=ks.in_cluster,
        do_xcom_push=True, get_logs=True, on_finish_action="delete_succeeded_pod",
        startup_timeout_seconds=ks.startup_timeout_s,
        doc_md=(f"Launches `{stage}` as a Kubeflow Trainer TrainJob on "
                f"{shape.launched[stage][0]} x {shape.launched[stage][1]} GPUs and waits for it"
                if launcher else None))
    if stage == SHARDED and shape.shards > 1:
        return operator_class().partial(**args).expand(shard=list(range(shape.shards)))
    return operator_class()(**args)


def container_exit_code(remote_pod, container: str = "base") -> int | None:
    """The base container's exit code in a finished pod, or None."""
    statuses = (remote_pod.status.container_statuses if remote_pod is not None
                and remote_pod.status else None) or []
    st = next((s for s in statuses if s.name == container), None)
    term = st.state.terminated if st is not None and st.state else None
    return term.exit_code if term is not None else None


def _main(argv: list[str]) -> int:
    """``python -m coaflow.orchestrate.airflow_pods xcom STAGE DIR RC``: print a stage's XCom (in a pod)."""
    if len(argv) != 4 or argv[0] != "xcom":
        print("usage: python -m coaflow.orchestrate.airflow_pods xcom STAGE DIR EXIT_CODE",
              file=sys.stderr)
        return EXIT_USER
    print(json.dumps(xcom_value(argv[1], argv[2], int(argv[3]))))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
