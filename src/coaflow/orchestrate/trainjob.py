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

Checked here: the manifest against the Trainer's API models (``kubeflow-trainer-api`` 2.3.0,
the models of the Kubeflow SDK 0.5). Not built yet: submitting it from a KFP task or an Airflow
task and waiting for it (the Kubeflow SDK's ``TrainerClient``), and the ``sft.nodes`` /
``sft.gpus_per_node`` config fields that would choose it.
"""

from __future__ import annotations

from collections.abc import Sequence

from coaflow.orchestrate.k8s import GPU_RESOURCE, KubernetesSettings

API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME = "torch-distributed"
NODE = "node"  # the torch runtime's replicated job and container
MANAGER = "coaflow"


def _env(ks: KubernetesSettings, run_id: str) -> list[dict]:
    env = [{"name": "COAFLOW_RUN_ID", "value": run_id},
           {"name": "GX_ANALYTICS_ENABLED", "value": "false"}]
    env += [{"name": s.env, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": s.key,
                                                            "optional": True}}}
            for s in ks.secrets]
    if ks.mlflow_configmap:  # env only (a TrainJob has no envFrom): the one key stages read
        env.append({"name": "MLFLOW_TRACKING_URI", "valueFrom": {"configMapKeyRef": {
            "name": ks.mlflow_configmap, "key": "MLFLOW_TRACKING_URI"}}})
    return env


def manifest(stage: str, stage_args: Sequence[str], ks: KubernetesSettings, *, nodes: int,
             gpus_per_node: int, name: str, run_id: str = "",
             runtime: str = RUNTIME) -> dict:
    """The TrainJob of ``coaflow stage STAGE STAGE_ARGS...`` on ``nodes`` x ``gpus_per_node``
    (one process per GPU; the stage's batch size is per process)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"{stage}: nodes and gpus_per_node must be >= 1, got {nodes}, "
                         f"{gpus_per_node}")
    res = ks.for_stage(stage)
    per_node = {"cpu": res.cpu, "memory": res.memory, GPU_RESOURCE: str(gpus_per_node)}
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
                    "template": {"spec": pod}}}}]}}}}],
        },
    }
