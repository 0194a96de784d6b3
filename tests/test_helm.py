"""Every chart under helm/: `helm lint --strict` clean, values checked by values.schema.json, and
every manifest it renders (default values and each ci/*.yaml) valid against the Kubernetes
schema, with resource requests and non-root pods. Helm is the Go SDK through helm-python-sdk."""

from pathlib import Path

import pytest
import yaml

from tests import requires
from tests.pods import pod_manifest

helm = requires.module("helm_python")
kubernetes_validate = requires.module("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHARTS = sorted(p.parent for p in (ROOT / "helm").glob("*/Chart.yaml"))
KUBE_VERSION = "1.33.0"
WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


def values_sets(chart: Path) -> list[tuple[str, dict]]:
    return [("default", {})] + [(p.name, yaml.safe_load(p.read_text()) or {})
                                for p in sorted((chart / "ci").glob("*.yaml"))]


def render(chart: Path, values: dict, revision: int = 1) -> list[dict]:
    manifests = helm.Chart.load(chart).render(values, name=chart.name, namespace="coaflow",
                                              revision=revision, is_install=revision == 1,
                                              is_upgrade=revision > 1)
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
    from coaflow.orchestrate import k8s

    ks = k8s.load()
    ((secret, secret_env),) = ks.secret_env().items()
    chart = ROOT / "helm" / "coaflow-pipeline"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert values["cache"]["name"] == ks.pvc and values["secrets"]["name"] == secret
    assert values["serviceAccount"]["name"] == ks.service_account
    assert values["mlflow"]["configMap"] == ks.mlflow_configmap
    assert values["secrets"]["env"] == secret_env and values["uid"] == ks.uid
    docs = render(chart, dict(values_sets(chart))["job-values.yaml"])
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    run = jobs["coaflow-pipeline-run-1"]["spec"]["template"]["spec"]
    assert run["serviceAccountName"] == "coaflow"  # the run's deploy step patches through it
    assert run["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert run["containers"][0]["args"][-2:] == ["--set=sft.epochs=2", "--set=run.seed=3"]
    assert run["volumes"][0]["persistentVolumeClaim"]["claimName"] == ks.pvc


def test_upgrade_renders_a_new_job_and_keeps_every_other_object():
    """A Job's pod template is immutable and the run Job's names the revision: an upgrade must
    render a Job of another name (Helm creates it and removes the old one), never the same
    name with a changed template; the rest keeps its names."""
    chart = ROOT / "helm" / "coaflow-pipeline"
    values = dict(values_sets(chart))["job-values.yaml"]
    first, second = render(chart, values, revision=1), render(chart, values, revision=2)
    ids = lambda docs: {(d["kind"], d["metadata"]["name"]) for d in docs}  # noqa: E731
    jobs = lambda docs: {d["metadata"]["name"]: d["spec"]["template"] for d in docs  # noqa: E731
                         if d["kind"] == "Job"
                         and "helm.sh/hook" not in d["metadata"].get("annotations", {})}
    assert set(jobs(first)) == {"coaflow-pipeline-run-1"}
    assert set(jobs(second)) == {"coaflow-pipeline-run-2"}
    assert "--run-id=coaflow-pipeline-2" in jobs(second)["coaflow-pipeline-run-2"]["spec"][
        "containers"][0]["args"]
    assert ids(first) - {("Job", "coaflow-pipeline-run-1")} == \
        ids(second) - {("Job", "coaflow-pipeline-run-2")}
    for doc in second:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _stage_pod_refs() -> set[tuple[str, str]]:
    """(kind, name) of every object the Airflow DAG's stage pods and the compiled KFP YAML
    refer to: ServiceAccounts, ConfigMaps, Secrets, PVCs."""
    from coaflow.contract import ORDER
    from coaflow.orchestrate import airflow as af

    refs = set()
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    for stage in ORDER:
        pod = pod_manifest(af.pod_spec(stage, settings, ["true"]))["spec"]
        refs.add(("ServiceAccount", pod["serviceAccountName"]))
        for c in pod["containers"]:
            refs |= {("ConfigMap", e["configMapRef"]["name"]) for e in c.get("envFrom", [])}
            refs |= {("Secret", e["valueFrom"]["secretKeyRef"]["name"]) for e in c["env"]
                     if "secretKeyRef" in e.get("valueFrom", {})}
        refs |= {("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
                 for v in pod["volumes"] if "persistentVolumeClaim" in v}
    docs = list(yaml.safe_load_all((ROOT / "components" / "coaflow_pipeline.yaml").read_text()))
    for ex in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        refs |= {("PersistentVolumeClaim", m["constant"]) for m in ex.get("pvcMount", [])}
        refs |= {("Secret", s["secretName"]) for s in ex.get("secretAsEnv", [])}
        refs |= {("ConfigMap", c["configMapName"]) for c in ex.get("configMapAsEnv", [])}
    return refs


# what the user brings, each documented in docs/cluster.md (a Secret of tokens never belongs in
# a Helm release: kubectl, external-secrets or sealed-secrets make it)
USERS_OWN = {("Secret", "coaflow-secrets")}


def test_every_object_the_pods_refer_to_is_created_by_a_chart_or_documented():
    created = set()
    for chart in CHARTS:
        created |= {(d["kind"], d["metadata"]["name"]) for d in render(chart, {})}
    refs = _stage_pod_refs()
    assert {k for k, _ in refs} >= {"ServiceAccount", "ConfigMap", "Secret",
                                    "PersistentVolumeClaim"}
    missing = refs - created - USERS_OWN
    assert not missing, f"referenced but neither created by a chart nor documented: {missing}"
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for kind, name in USERS_OWN:
        assert f"`{name}`" in docs and "existing Secret" in docs, (kind, name)


def test_roles_are_least_privilege():
    docs = render(ROOT / "helm" / "coaflow-pipeline", {})
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"coaflow-pipeline-airflow-pods", "coaflow-pipeline-deploy",
                          "coaflow-pipeline-trainjobs"}
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in roles.values():
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    pods = roles["coaflow-pipeline-airflow-pods"]["rules"]
    assert {r for rule in pods for r in rule["resources"]} == {"pods", "pods/log", "pods/exec",
                                                               "events"}
    for rule in roles["coaflow-pipeline-deploy"]["rules"]:  # only the serving Deployment
        assert rule["resourceNames"] == ["coaflow-serving"] and "create" not in rule["verbs"]
    serving = {d["metadata"]["name"] for d in render(ROOT / "helm" / "coaflow-serving", {})
               if d["kind"] == "Deployment"}
    assert serving == {"coaflow-serving"}
    trainjobs = roles["coaflow-pipeline-trainjobs"]["rules"]  # the launch step: no pod writes
    assert {(g, r) for rule in trainjobs for g in rule["apiGroups"] for r in rule["resources"]
            } == {("trainer.kubeflow.org", "trainjobs"), ("", "pods"), ("", "pods/log")}
    assert [r["verbs"] for r in trainjobs] == [["create", "get", "delete"], ["list"], ["get"]]
    bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert bindings["coaflow-pipeline-deploy"]["subjects"][0]["name"] == "coaflow"
    assert bindings["coaflow-pipeline-trainjobs"]["subjects"][0]["name"] == "coaflow"
    kfp = render(ROOT / "helm" / "coaflow-pipeline",
                 {"rbac": {"trainjobs": {"serviceAccounts": ["default-editor"]}}})
    binding = next(d for d in kfp if d["metadata"]["name"] == "coaflow-pipeline-trainjobs"
                   and d["kind"] == "RoleBinding")
    assert [s["name"] for s in binding["subjects"]] == ["coaflow", "default-editor"]
