"""The Kubernetes settings of every stage pod, one file for both engines.

``k8s.yaml`` beside this module (package data, so an installed coaflow finds it too; another file
with ``COAFLOW_K8S_CONFIG``) says, per stage, the image, CPU/memory (requests = limits), GPUs, and
for every pod the PVC, the secrets, the MLflow ConfigMap, the GPU node selector and tolerations,
the /dev/shm size, the user and the service account. The Airflow DAG builds its pods from it
(``orchestrate.airflow_pods.pod_spec``), the Kubeflow pipeline its tasks (``orchestrate.kfp``) and a
Trainer TrainJob its nodes (``orchestrate.trainjob``); ``tests/test_k8s_settings.py`` checks that
Airflow's pods and KFP's tasks agree for every stage.

On a cluster the settings come from the one values file of the install (``helm/coaflow``, whose
``global`` section every chart reads): ``load`` takes that file too and derives the settings from
it (``from_values``): the images, the namespace, the GPU placement, the objects' names, and the
config overrides that name what the charts made (the registered model, the serving Deployment
and its URL, the teacher). So the charts, the compiled KFP pipeline and the Airflow DAG agree by
construction. ``python -m coaflow.orchestrate.k8s --values FILE`` prints the derived settings
(the Airflow DAG's ConfigMap), ``--airflow-chart`` the official Airflow chart's values.
"""

from __future__ import annotations

import os
import re
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

    profile: str | None = Field(None, description="the cluster's profile: the KFP pipeline is "
                                "compiled for it, the Airflow DAG's form defaults to it")
    overrides: list[str] = Field(
        default_factory=list, description="config overrides every run here starts from, before "
        "its own: the names the charts made (registered model, serving Deployment, teacher)")

    launcher: PodResources = Field(
        default_factory=lambda: PodResources(cpu="1", memory="2Gi"),
        description="the pod that submits a stage's Trainer TrainJob and waits for it (CPU "
        "image; it copies KFP artifacts to and from the PVC)")

    def for_stage(self, stage: str) -> PodResources:
        return self.resources.get(stage) or self.resources.get("default") or PodResources()

    def image_for(self, stage: str) -> str:
        """GPU stages run the GPU image; the rest the (much smaller) CPU image."""
        return self.images.gpu if self.for_stage(stage).gpus else self.images.cpu

    def node_resources(self, stage: str, gpus: int) -> dict[str, str]:
        """CPU and memory of a TrainJob node with ``gpus`` GPUs: a GPU stage's resources are
        per GPU process, so a node running ``gpus`` of them gets ``gpus`` times as much.

        >>> KubernetesSettings(images=Images(cpu="c", gpu="g"), xcom_sidecar_image="x",
        ...     resources={"sft": PodResources(cpu="8", memory="64Gi", gpus=1)}
        ...     ).node_resources("sft", 8)
        {'cpu': '64', 'memory': '512Gi'}
        """
        res = self.for_stage(stage)
        per = max(res.gpus, 1)
        return {"cpu": scale(res.cpu, gpus, per), "memory": scale(res.memory, gpus, per)}

    def secret_env(self) -> dict[str, dict[str, str]]:
        """Secret -> {key: env var}, the shape KFP's ``use_secret_as_env`` takes."""
        out: dict[str, dict[str, str]] = {}
        for s in self.secrets:
            out.setdefault(s.secret, {})[s.key] = s.env
        return out


def scale(quantity: str, times: int, per: int = 1) -> str:
    """A Kubernetes quantity times ``times / per`` (``"500m"`` x 3 -> ``"1500m"``).

    >>> scale("8", 8), scale("64Gi", 2), scale("500m", 3), scale("1.5", 2), scale("16Gi", 1, 2)
    ('64', '128Gi', '1500m', '3', '8Gi')
    """
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(quantity))
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    value = float(m.group(1)) * times / per
    return f"{int(value) if value == int(value) else round(value, 3)}{m.group(2)}"


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
    if isinstance(data, dict) and VALUES_KEY in data:  # the install's one values file
        data = from_values(data, path)
    try:
        return KubernetesSettings.model_validate(data)
    except ValidationError as e:
        raise invalid(path, e) from None


def invalid(path, e: ValidationError) -> UserError:
    """One line naming the settings file, the field and what is wrong with it."""
    err = e.errors()[0]
    return UserError(f"{path}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}")


# --- the one values file of the install (helm/coaflow) -----------------------------------------

VALUES_KEY = "global"  # a values file has it; the settings file does not
MODEL_SUFFIX = "-agent"  # register registers <run.name>-agent (coaflow.registry.model_name)
TEACHER_SERVICE = "coaflow-teacher"  # helm/coaflow-pipeline's teacher Deployment and Service
SERVING = "coaflow-serving"  # helm/coaflow-serving's Deployment and Service (fullnameOverride)
TEACHER_MODEL = "Qwen/Qwen3-32B"  # = helm/coaflow values.yaml global.teacher.model
AIRFLOW_VERSION = "3.3.2"  # images/airflow.Dockerfile's base; the Airflow chart's airflowVersion
AIRFLOW_SETTINGS = "/opt/coaflow/k8s"  # where the Airflow pods mount the ConfigMap coaflow-k8s
# what the values file sets through `global` or a chart's section, never under `pods`
DERIVED = {"namespace", "images", "image_pull_policy", "gpu_node_selector", "gpu_tolerations",
           "service_account", "uid", "pvc", "mlflow_configmap", "secrets", "profile", "overrides"}


def _image(registry: str, name: str, tag: str) -> str:
    return f"{registry.rstrip('/')}/coaflow-{name}:{tag}"


def _split_image(image: str) -> tuple[str, str]:
    """``ghcr.io/coaflow/coaflow-cpu:0.1.0`` -> ``("ghcr.io/coaflow", "0.1.0")``."""
    repo, _, tag = image.rpartition(":")
    return repo.rpartition("/")[0], tag


def from_values(values: Mapping[str, Any], path: str | Path = "values") -> dict[str, Any]:
    """The settings (a dict for ``KubernetesSettings``) that the install's values file implies:
    the packaged ``k8s.yaml``'s defaults, the stage pods' own knobs from its ``pods`` section,
    and what the charts share through ``global`` (images, namespace, GPU placement, the profile)
    or name in their own sections (the PVC, service account, ConfigMap, Secret, uid); then the
    overrides every run starts from, so that the stages use what the charts made: the model
    name (``run.name``), the serving Deployment ``deploy`` rolls out and smoke-tests, the
    teacher endpoint. The charts derive the same from the same file (helm/coaflow-pipeline's
    ``coaflow-pipeline.runOverrides``); ``tests/test_cluster_install.py`` checks they agree."""
    g = values.get(VALUES_KEY) or {}
    pipeline = values.get("coaflow-pipeline") or {}
    pods = dict(values.get("pods") or {})
    taken = sorted(set(pods) & DERIVED)
    if taken:
        raise UserError(f"{path}: pods.{taken[0]}: set by the charts' values (global or "
                        "coaflow-pipeline), not here: one value for every chart and engine")
    data = {**(yaml.safe_load(PACKAGED.read_text()) or {}), **pods}
    registry, tag = _split_image(data["images"]["cpu"])
    images = g.get("images") or {}
    registry, tag = images.get("registry") or registry, str(images.get("tag") or tag)
    data["images"] = {kind: _image(registry, kind, tag) for kind in ("cpu", "gpu")}
    data["image_pull_policy"] = images.get("pullPolicy") or data["image_pull_policy"]
    ns = data["namespace"] = g.get("namespace") or data["namespace"]
    gpu = g.get("gpu") or {}
    data["gpu_node_selector"] = gpu.get("nodeSelector", data["gpu_node_selector"])
    data["gpu_tolerations"] = gpu.get("tolerations", data["gpu_tolerations"])
    data["pvc"] = (pipeline.get("cache") or {}).get("name") or data["pvc"]
    data["service_account"] = (pipeline.get("serviceAccount") or {}).get("name") or \
        data["service_account"]
    data["mlflow_configmap"] = (pipeline.get("mlflow") or {}).get("configMap") or \
        data["mlflow_configmap"]
    data["uid"] = pipeline.get("uid") or data["uid"]
    secrets = pipeline.get("secrets") or {}
    if secrets.get("name") or secrets.get("env"):
        name = secrets.get("name") or data["secrets"][0]["secret"]
        env = secrets.get("env") or {s["key"]: s["env"] for s in data["secrets"]}
        data["secrets"] = [{"env": var, "secret": name, "key": key} for key, var in env.items()]
    run = g.get("run") or {}
    data["profile"] = run.get("profile") or data.get("profile")
    data["overrides"] = run_overrides(values, ns, path) + [str(o) for o in
                                                           run.get("overrides") or []]
    return data


def run_overrides(values: Mapping[str, Any], namespace: str, path: str | Path) -> list[str]:
    """The overrides that point a run at what the charts made: ``run.name`` (register's model
    is ``<run.name>-agent``, the name serving serves), deploy to the serving Deployment of this
    namespace, and the teacher (an endpoint you name, or the chart's teacher Deployment)."""
    g = values.get(VALUES_KEY) or {}
    pipeline = values.get("coaflow-pipeline") or {}
    out = []
    model = g.get("modelName")
    if model:
        if not str(model).endswith(MODEL_SUFFIX):
            raise UserError(f"{path}: global.modelName: {model!r} must end in {MODEL_SUFFIX!r} "
                            "(register registers <run.name>-agent)")
        # the Deployment the deploy Role names (helm/coaflow pins serving's name to it)
        name = (((pipeline.get("rbac") or {}).get("deploy") or {}).get("deployments")
                or [SERVING])[0]
        out += [f"run.name={str(model)[:-len(MODEL_SUFFIX)]}", "deploy.target=kubernetes",
                f"deploy.kubernetes.namespace={namespace}", f"deploy.kubernetes.deployment={name}",
                f"deploy.kubernetes.service_url=http://{name}.{namespace}:8000/v1"]
    teacher, deployed = g.get("teacher") or {}, pipeline.get("teacher") or {}
    if teacher.get("url") and deployed.get("enabled"):
        raise UserError(f"{path}: global.teacher.url and coaflow-pipeline.teacher.enabled: "
                        "name an endpoint or deploy the teacher, not both")
    url = teacher.get("url") or (f"http://{TEACHER_SERVICE}.{namespace}:8000/v1"
                                 if deployed.get("enabled") else None)
    if url:
        served = deployed.get("model") or teacher.get("model") or TEACHER_MODEL
        out += [f"synthesize.llm.base_url={url}", f"synthesize.llm.model={served}"]
    return out


def airflow_chart_values(ks: KubernetesSettings) -> dict[str, Any]:
    """Values of the official Airflow chart (apache-airflow/airflow) for the install whose
    settings are ``ks``: the coaflow Airflow image of the same registry and tag, its Airflow
    version, kubernetes mode, and the DAG's pod settings from the ConfigMap ``coaflow-k8s``
    (this module's output) mounted into every Airflow pod."""
    registry, tag = _split_image(ks.images.cpu)
    return {
        "airflowVersion": AIRFLOW_VERSION,
        "images": {"airflow": {"repository": f"{registry}/coaflow-airflow", "tag": tag,
                               "pullPolicy": ks.image_pull_policy}},
        "env": [{"name": "COAFLOW_AIRFLOW_MODE", "value": "kubernetes"},
                {"name": ENV_VAR, "value": f"{AIRFLOW_SETTINGS}/k8s.yaml"}],
        "volumes": [{"name": "coaflow-k8s", "configMap": {"name": "coaflow-k8s"}}],
        "volumeMounts": [{"name": "coaflow-k8s", "mountPath": AIRFLOW_SETTINGS,
                          "readOnly": True}],
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m coaflow.orchestrate.k8s --values FILE [--airflow-chart]``: the settings the
    values file implies (the Airflow DAG's ConfigMap), or the Airflow chart's values."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m coaflow.orchestrate.k8s",
                                     description=main.__doc__)
    parser.add_argument("--values", required=True, help="the install's values file")
    parser.add_argument("--airflow-chart", action="store_true",
                        help="print the official Airflow chart's values instead")
    args = parser.parse_args(argv)
    try:
        ks = load(args.values)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    out = airflow_chart_values(ks) if args.airflow_chart else ks.model_dump(mode="json")
    print(f"# derived from {args.values} by python -m coaflow.orchestrate.k8s; regenerate, do "
          "not edit")
    print(yaml.safe_dump(out, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
