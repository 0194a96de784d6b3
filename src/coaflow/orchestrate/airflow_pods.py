"""The Airflow DAG's kubernetes mode: each stage task a ``KubernetesPodOperator`` whose pod runs
the stage's ``coaflow stage`` argv (``orchestrate.airflow``'s plan) in the coaflow image, as the
images' non-root user, with the pod settings both engines read (``orchestrate.k8s``), and hands
its ``result.json`` on as XCom. Imports no Airflow at module level.

    python -m coaflow.orchestrate.airflow_pods xcom STAGE DIR RC   # in the pod: the XCom
"""

from __future__ import annotations

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


def pod_spec(stage: str, settings: Settings, command: Sequence[str], run_id: str = "",
             launcher: bool = False):
    """The ``V1Pod`` for one stage: the base container (KubernetesPodOperator's ``base``) runs
    ``command`` in the stage's image (GPU stages the GPU image, the rest the CPU one), as the
    images' non-root user, with the run's PVC, secrets, MLflow ConfigMap and, for GPU stages,
    GPU limits, tolerations, a node selector and a RAM-backed /dev/shm. Every value comes from
    the Kubernetes settings file the Kubeflow pipeline reads too. A ``launcher`` (the pod that
    submits a stage's TrainJob) is a CPU pod with the launcher's resources."""
    from kubernetes.client import models as km

    ks = settings.kubernetes
    res = ks.launcher if launcher else ks.for_stage(stage)
    limits = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        limits[GPU_RESOURCE] = str(res.gpus)
    env = [km.V1EnvVar(name=contract.RUN_ID_ENV, value=run_id)]
    env += [km.V1EnvVar(name=s.env, value_from=km.V1EnvVarSource(
        secret_key_ref=km.V1SecretKeySelector(name=s.secret, key=s.key, optional=True)))
        for s in ks.secrets]
    env_from = ([km.V1EnvFromSource(config_map_ref=km.V1ConfigMapEnvSource(
        name=ks.mlflow_configmap))] if ks.mlflow_configmap else None)
    mounts = [km.V1VolumeMount(name="work", mount_path=ks.mount_path)]
    volumes = [km.V1Volume(name="work", persistent_volume_claim=(
        km.V1PersistentVolumeClaimVolumeSource(claim_name=ks.pvc)))]
    if res.gpus:
        mounts.append(km.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
        volumes.append(km.V1Volume(name="dshm", empty_dir=km.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=ks.shm_size)))
    container = km.V1Container(
        name="base", image=ks.images.cpu if launcher else ks.image_for(stage),
        image_pull_policy=ks.image_pull_policy,
        command=list(command), env=env, env_from=env_from, volume_mounts=mounts,
        resources=km.V1ResourceRequirements(requests=dict(limits), limits=limits),
        security_context=container_security(ks.uid))
    tolerations = [km.V1Toleration(**t) for t in ks.gpu_tolerations] if res.gpus else None
    return km.V1Pod(
        api_version="v1", kind="Pod",
        metadata=km.V1ObjectMeta(namespace=ks.namespace, labels={
            "app.kubernetes.io/name": "coaflow", "coaflow/stage": stage}),
        spec=km.V1PodSpec(
            containers=[container], volumes=volumes, restart_policy="Never",
            service_account_name=ks.service_account, tolerations=tolerations,
            security_context=km.V1PodSecurityContext(
                run_as_non_root=True, run_as_user=ks.uid, run_as_group=ks.uid,
                seccomp_profile=km.V1SeccompProfile(type="RuntimeDefault")),
            node_selector=dict(ks.gpu_node_selector) if res.gpus and ks.gpu_node_selector
            else None))


def harden_sidecar(pod, settings: Settings):
    """The provider's XCom sidecar as the base container: a pinned image (its default is an
    untagged ``alpine``), the restricted security context, a memory limit."""
    from kubernetes.client import models as km

    for c in pod.spec.containers:
        if c.name == "airflow-xcom-sidecar":
            c.image = settings.kubernetes.xcom_sidecar_image
            c.security_context = container_security(settings.kubernetes.uid)
            c.resources = km.V1ResourceRequirements(requests={"cpu": "1m", "memory": "10Mi"},
                                                     limits={"memory": "32Mi"})
    return pod


def pod_operator(stage: str, settings: Settings, shape: Shape | None = None):
    """A KubernetesPodOperator for ``stage``: its pod is built at run time from the run's plan
    and its inputs' XComs; a failed pod is retried only for the retryable exit codes. With
    ``shape`` (the DAG's): synthesize is mapped over its shards (``.expand(shard=...)``), and a
    launched stage's pod is the TrainJob launcher on the CPU image."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    shape = shape or Shape()
    launcher = stage in shape.launched

    class CoaflowPodOperator(KubernetesPodOperator):
        def __init__(self, *, shard: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.shard = shard

        def execute(self, context):
            ti = context["ti"]
            the_plan = ti.xcom_pull(task_ids="configure")
            inputs = pull_inputs(ti, stage, self.dag.task_ids)
            command = pod_command(stage, the_plan, inputs, self.shard, settings.kubernetes)
            self.full_pod_spec = pod_spec(stage, settings, command, the_plan["run_id"],
                                          launcher=launcher)
            return super().execute(context)

        def build_pod_request_obj(self, context=None):
            return harden_sidecar(super().build_pod_request_obj(context), settings)

        def cleanup(self, pod, remote_pod):
            try:
                super().cleanup(pod, remote_pod)
            except AirflowException as e:
                if isinstance(e, AirflowFailException) or type(e).__name__ == "AirflowSkipException":
                    raise
                code = container_exit_code(remote_pod)
                if code is not None and outcome(code) == "fail":
                    raise AirflowFailException(
                        f"stage {stage} exited {code} ({exit_meaning(code)})") from e
                raise

    ks = settings.kubernetes
    args = dict(
        task_id=stage, name=f"coaflow-{'launch-' if launcher else ''}{stage}",
        namespace=ks.namespace, image=ks.images.cpu if launcher else ks.image_for(stage),
        kubernetes_conn_id=ks.kubernetes_conn_id, in_cluster=ks.in_cluster,
        do_xcom_push=True, get_logs=True, on_finish_action="delete_succeeded_pod",
        startup_timeout_seconds=ks.startup_timeout_s,
        doc_md=(f"Launches `{stage}` as a Kubeflow Trainer TrainJob on "
                f"{shape.launched[stage][0]} x {shape.launched[stage][1]} GPUs and waits for it"
                if launcher else None))
    if stage == SHARDED and shape.shards > 1:
        return CoaflowPodOperator.partial(**args).expand(shard=list(range(shape.shards)))
    return CoaflowPodOperator(**args)


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
