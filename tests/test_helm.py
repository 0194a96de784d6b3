"""Every chart under helm/: `helm lint --strict` clean, values checked by values.schema.json, and
every manifest it renders (default values and each ci/*.yaml) valid against the Kubernetes
schema, with resource requests and non-root pods. Helm is the Go SDK through helm-python-sdk."""

from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="pip install -e '.[dev]' (helm-python-sdk)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHARTS = sorted(p.parent for p in (ROOT / "helm").glob("*/Chart.yaml"))
KUBE_VERSION = "1.33.0"
WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


def values_sets(chart: Path) -> list[tuple[str, dict]]:
    return [("default", {})] + [(p.name, yaml.safe_load(p.read_text()) or {})
                                for p in sorted((chart / "ci").glob("*.yaml"))]


def render(chart: Path, values: dict) -> list[dict]:
    manifests = helm.Chart.load(chart).render(values, name=chart.name, namespace="coaflow",
                                              is_install=True)
    return [doc for name, text in manifests.items() if name.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    template = doc.get("spec", {}).get("template", {}).get("spec")
    job = doc.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
    return [s for s in (template, job.get("spec")) if s]


def test_there_are_charts():
    assert {c.name for c in CHARTS} >= {"coaflow-tracking", "coaflow-pipeline"}


@pytest.mark.parametrize("chart", CHARTS, ids=lambda p: p.name)
def test_lint_is_clean_and_values_have_a_schema(chart):
    assert (chart / "values.schema.json").exists()
    for label, values in values_sets(chart):
        report = helm.lint(chart, values, strict=True, kube_version=f"v{KUBE_VERSION}")
        bad = [m for m in report["messages"] if m["severity"] >= WARNING] + report["errors"]
        assert not bad, (label, bad)


@pytest.mark.parametrize("chart", CHARTS, ids=lambda p: p.name)
def test_rendered_manifests_are_valid_kubernetes_with_requests_and_non_root_pods(chart):
    for label, values in values_sets(chart):
        docs = render(chart, values)
        assert docs, label
        for doc in docs:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            for spec in pod_specs(doc):
                pod_ctx = spec.get("securityContext", {})
                for c in spec["containers"] + spec.get("initContainers", []):
                    where = (label, doc["kind"], doc["metadata"]["name"], c["name"])
                    ctx = {**pod_ctx, **c.get("securityContext", {})}
                    assert ctx.get("runAsNonRoot") is True, where
                    assert ctx.get("allowPrivilegeEscalation") is False, where
                    assert c.get("resources", {}).get("requests"), where


def test_the_schema_refuses_a_bad_value():
    chart = helm.Chart.load(ROOT / "helm" / "coaflow-tracking")
    with pytest.raises(helm.HelmValuesError, match="backend"):
        chart.render({"backend": {"type": "mysql"}}, name="t", namespace="coaflow")


def test_tracking_backends_trial_and_production():
    chart = ROOT / "helm" / "coaflow-tracking"
    trial = {d["kind"]: d for d in render(chart, {})}
    env = {e["name"]: e for e in trial["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "sqlite:////data/mlflow.db"
    assert "PersistentVolumeClaim" in trial
    assert trial["Deployment"]["spec"]["strategy"]["type"] == "Recreate"  # one writer of SQLite

    prod = {d["kind"]: d for d in render(chart, dict(values_sets(chart))["production-values.yaml"])}
    container = prod["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri == "postgresql://mlflow:$(PGPASSWORD)@coaflow-postgresql.db.svc:5432/mlflow"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "coaflow-mlflow-db"
    assert "--artifacts-destination=s3://coaflow-mlflow/artifacts" in container["args"]
    assert not any("PGPASSWORD" in a for a in container["args"])  # no password in the args
    assert "mlflow.example.com" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert "PersistentVolumeClaim" not in prod


def test_tracking_refuses_replicas_over_sqlite():
    chart = helm.Chart.load(ROOT / "helm" / "coaflow-tracking")
    with pytest.raises(helm.HelmError, match="replicas > 1"):
        chart.render({"replicas": 2}, name="t", namespace="coaflow")


def test_pipeline_chart_creates_what_the_compiled_pipeline_refers_to():
    from components import coaflow_pipeline as cp

    chart = ROOT / "helm" / "coaflow-pipeline"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert values["cache"]["name"] == cp.CACHE_PVC and values["secrets"]["name"] == cp.SECRET
    assert values["secrets"]["env"] == cp.SECRET_ENV and values["uid"] == cp.UID
    docs = render(chart, dict(values_sets(chart))["job-values.yaml"])
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    run = jobs["coaflow-pipeline-run"]["spec"]["template"]["spec"]
    assert run["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert run["containers"][0]["args"][-2:] == ["--set=sft.epochs=2", "--set=run.seed=3"]
    assert run["volumes"][0]["persistentVolumeClaim"]["claimName"] == cp.CACHE_PVC
