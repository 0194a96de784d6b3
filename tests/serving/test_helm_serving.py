"""helm/coaflow-serving: lint clean, values checked by its schema, the rendered manifests valid
Kubernetes (GPU and CPU values) with what serving needs: GPU requests and tolerations, the
init container that fetches the registry version, probes, the Service, the optional HPA, non-root
pods, and the pod annotation that `coaflow deploy` patches."""

from pathlib import Path

import pytest
import yaml

from tests import requires

helm = requires.module("helm_python")
kubernetes_validate = requires.module("kubernetes_validate")

CHART = Path(__file__).resolve().parents[2] / "helm" / "coaflow-serving"
KUBE_VERSION = "1.33.0"
CPU = yaml.safe_load((CHART / "ci" / "cpu-values.yaml").read_text())


def render(values: dict) -> dict[str, dict]:
    out = helm.Chart.load(CHART).render(values, name="coaflow-serving", namespace="coaflow",
                                        is_install=True)
    docs = [d for n, t in out.items() if n.endswith(".yaml") for d in yaml.safe_load_all(t) if d]
    for d in docs:
        kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("values", [{}, CPU], ids=["gpu", "cpu"])
def test_lint_is_clean(values):
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"]


def test_gpu_rendering():
    docs = render({})
    assert set(docs) == {"Deployment", "Service"}
    dep = docs["Deployment"]
    assert dep["metadata"]["name"] == "coaflow-serving"  # deploy.kubernetes.deployment default
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"]["coaflow.io/model-uri"] == \
        "models:/coaflow-agent@champion"
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    init, server = spec["initContainers"][0], spec["containers"][0]
    assert "coaflow models fetch" in init["args"][0]
    assert server["name"] == "server"  # deploy.kubernetes.container default
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "--engine=vllm" in server["args"]
    for c in (init, server):
        env = {e["name"]: e for e in c["env"]}
        assert env["MODEL_URI"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['coaflow.io/model-uri']"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p: server[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe",
                                                       "startupProbe")} == dict.fromkeys(
        ("readinessProbe", "livenessProbe", "startupProbe"), "/health")
    assert server["startupProbe"]["failureThreshold"] == 120


def test_cpu_twin_with_autoscaling():
    docs = render(CPU)
    assert docs["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 3
    dep = docs["Deployment"]
    assert "replicas" not in dep["spec"]  # the HPA owns it
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--engine=transformers" in server["args"]
    assert "nvidia.com/gpu" not in server["resources"]["limits"]
    assert "tolerations" not in dep["spec"]["template"]["spec"]


def test_the_schema_refuses_bad_values():
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match="uri"):
        chart.render({"model": {"uri": "runs:/abc/model", "servedName": "x"}}, name="t")
    with pytest.raises(helm.HelmValuesError, match="engine"):
        chart.render({"engine": "tgi"}, name="t")


def test_a_rollout_fits_one_gpu():
    """One replica on one GPU: the default strategy replaces the pod instead of starting a
    second one first (Kubernetes' default, maxSurge 25% rounded up to 1, needs a second free
    GPU and stalls until deploy's rollout_timeout_s). The CPU twin may surge."""
    strategy = render({})["Deployment"]["spec"]["strategy"]
    assert strategy["type"] == "Recreate" or strategy["rollingUpdate"]["maxSurge"] == 0
    assert render(CPU)["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1


def test_before_the_first_promotion_the_pod_waits_for_the_version():
    """`coaflow models fetch` exits 2 while the model or its champion alias does not exist yet
    and 75 while the registry does not answer: the init container waits those out (deploy then
    rolls the pod to the promoted version) and fails on anything else."""
    init = render({})["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    script = init["args"][0]
    assert script.startswith("until dst=\"$(coaflow models fetch")
    assert '[ "$rc" -ne 2 ] && [ "$rc" -ne 75 ]' in script and "sleep 30" in script
    once = render({"model": {"waitForVersion": False}})["Deployment"]
    assert "until" not in once["spec"]["template"]["spec"]["initContainers"][0]["args"][0]


def test_the_install_values_pick_the_image_model_and_gpu_placement():
    """Through helm/coaflow: the built image of the install's registry and tag, the registered
    model's champion served under the registered name (deploy's smoke test sends it)."""
    values = yaml.safe_load((CHART / "ci" / "global-values.yaml").read_text())
    dep = render(values)["Deployment"]
    pod = dep["spec"]["template"]
    assert pod["metadata"]["annotations"]["coaflow.io/model-uri"] == \
        "models:/coaflow-qwen3-0.6b-agent@champion"
    server = pod["spec"]["containers"][0]
    assert server["image"] == "registry.example.com/ml/coaflow-gpu:0.2.0"
    assert pod["spec"]["initContainers"][0]["image"] == server["image"]
    assert server["imagePullPolicy"] == "Always"
    assert "--name=coaflow-qwen3-0.6b-agent" in server["args"]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    cpu = render({**values, **CPU})["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert cpu["image"] == "registry.example.com/ml/coaflow-cpu:0.2.0"
