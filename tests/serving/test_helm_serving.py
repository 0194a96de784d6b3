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
