"""The Kubernetes settings of every stage pod, one file for both engines.

``k8s.yaml`` beside this module (package data, so an installed coaflow finds it too; another file
with ``COAFLOW_K8S_CONFIG``) says, per stage, the image, CPU/memory (requests = limits), GPUs, and
for every pod the PVC, the secrets, the MLflow ConfigMap, the GPU node selector and tolerations,
the /dev/shm size, the user and the service account. The Airflow DAG builds its pods from it
(``orchestrate.airflow.pod_spec``), the Kubeflow pipeline its tasks (``orchestrate.kfp``) and a
Trainer TrainJob its nodes (``orchestrate.trainjob``); ``tests/test_k8s_settings.py`` checks that
Airflow's pods and KFP's tasks agree for every stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coaflow.errors import UserError

PACKAGED = Path(__file__).with_name("k8s.yaml")
ENV_VAR = "COAFLOW_K8S_CONFIG"
GPU_RESOURCE = "nvidia.com/gpu"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretEnv(_Strict):
    env: str = Field(description="environment variable the stage reads (e.g. OPENAI_API_KEY)")
    secret: str = Field(description="Kubernetes Secret name")
    key: str = Field(description="key inside the Secret")


class PodResources(_Strict):
    cpu: str = Field("2", description="CPU request and limit")
    memory: str = Field("8Gi", description="memory request and limit")
    gpus: int = Field(0, ge=0, description="GPUs (requests = limits); >0: the GPU image, node "
                      "selector, tolerations and /dev/shm")


class Images(_Strict):
    cpu: str = Field(description="coaflow CPU image (images/cpu.Dockerfile)")
    gpu: str = Field(description="coaflow GPU image (images/gpu.Dockerfile)")


class KubernetesSettings(_Strict):
    namespace: str = Field("coaflow", description="namespace the stage pods run in")
    images: Images
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str | None = Field("coaflow", description="pods' service account")
    uid: int = Field(1000, ge=1, description="the images' user; pods run as it, never root")
    pvc: str = Field("coaflow-work", description="PersistentVolumeClaim (ReadWriteMany) that holds "
                     "the stage folders and the cache; every stage pod mounts it")
    mount_path: str = Field("/data/coaflow", description="where the PVC is mounted: run.workdir")
    mlflow_configmap: str | None = Field("coaflow-mlflow", description="ConfigMap whose keys become "
                                         "env vars (MLFLOW_TRACKING_URI=http://...)")
    secrets: list[SecretEnv] = Field(default_factory=list, description="env vars from Secrets")
    resources: dict[str, PodResources] = Field(
        default_factory=lambda: {"default": PodResources()},
        description="per stage; 'default' for stages not listed")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    shm_size: str = Field("16Gi", description="/dev/shm for GPU pods (NCCL, data loaders)")
    xcom_sidecar_image: str = Field(description="Airflow's XCom sidecar, pinned")
    kubernetes_conn_id: str = Field("kubernetes_default", description="Airflow connection")
    in_cluster: bool = Field(True, description="Airflow itself runs in the cluster")
    startup_timeout_s: int = Field(900, ge=1, description="time to pull the image and schedule")

    launcher: PodResources = Field(
        default_factory=lambda: PodResources(cpu="1", memory="2Gi"),
        description="the pod that submits a stage's Trainer TrainJob and waits for it (CPU "
        "image; it copies KFP artifacts to and from the PVC)")

    def for_stage(self, stage: str) -> PodResources:
        return self.resources.get(stage) or self.resources.get("default") or PodResources()

    def image_for(self, stage: str) -> str:
        """GPU stages run the GPU image; the rest the (much smaller) CPU image."""
        return self.images.gpu if self.for_stage(stage).gpus else self.images.cpu

    def secret_env(self) -> dict[str, dict[str, str]]:
        """Secret -> {key: env var}, the shape KFP's ``use_secret_as_env`` takes."""
        out: dict[str, dict[str, str]] = {}
        for s in self.secrets:
            out.setdefault(s.secret, {})[s.key] = s.env
        return out


def settings_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(ENV_VAR) or PACKAGED)


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None
         ) -> KubernetesSettings:
    """The settings in ``path`` (default ``$COAFLOW_K8S_CONFIG``, else the packaged file); a
    missing file or a bad field is a ``UserError`` naming the file and the field."""
    path = Path(path) if path else settings_path(env)
    if not path.is_file():
        raise UserError(f"{path}: Kubernetes settings file not found (set {ENV_VAR})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    try:
        return KubernetesSettings.model_validate(data)
    except ValidationError as e:
        raise invalid(path, e) from None


def invalid(path, e: ValidationError) -> UserError:
    """One line naming the settings file, the field and what is wrong with it."""
    err = e.errors()[0]
    return UserError(f"{path}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}")
