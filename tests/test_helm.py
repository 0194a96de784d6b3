"""Every chart under helm/: `helm lint --strict` clean, values checked by values.schema.json, and
every manifest it renders (default values and each ci/*.yaml) valid against the Kubernetes
schema, with resource requests and non-root pods. Helm is the Go SDK through helm-python-sdk.
The umbrella chart helm/coaflow (the three as dependencies, one values file) is rendered from a
copy whose charts/ `helm dependency update` filled (tests/charts.py)."""

import json
from pathlib import Path

import pytest
import yaml

from tests import charts, requires
from tests.charts import CHARTS, KUBE_VERSION, ROOT, SUBCHARTS, UMBRELLA
from tests.pods import pod_manifest

helm = requires.module("helm_python")
kubernetes_validate = requires.module("kubernetes_validate")

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """helm/ with the umbrella's dependencies packaged (as `helm dependency update` does)."""
    return charts.build(tmp_path_factory.mktemp("helm"))


def values_sets(chart: Path) -> list[tuple[str, dict]]:
    """Default values and each ci/*.yaml; the umbrella has no defaults that install (the model
    name and the profile are the user's), so only its ci/ files."""
    return [("default", {})] * (chart != UMBRELLA) + [
        (p.name, yaml.safe_load(p.read_text()) or {}) for p in sorted((chart / "ci").glob("*.yaml"))]


def namespace_of(values: dict) -> str:
    return (values.get("global") or {}).get("namespace", "coaflow")


def render(chart: Path, values: dict, revision: int = 1, namespace: str = "coaflow") -> list[dict]:
    return charts.render(chart, values, name=chart.name, namespace=namespace, revision=revision)


def pod_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    template = doc.get("spec", {}).get("template", {}).get("spec")
    job = doc.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {})
    return [s for s in (template, job.get("spec")) if s]


def test_there_are_charts():
    assert {c.name for c in CHARTS} >= {"coaflow-tracking", "coaflow-pipeline"}


@pytest.mark.parametrize("chart", CHARTS, ids=lambda p: p.name)
def test_lint_is_clean_and_values_have_a_schema(chart, built):
    assert (chart / "values.schema.json").exists()
    for label, values in values_sets(chart):
        report = helm.lint(built / chart.name, values, strict=True, namespace=namespace_of(values),
                           with_subcharts=True, kube_version=f"v{KUBE_VERSION}")
        bad = [m for m in report["messages"] if m["severity"] >= WARNING] + report["errors"]
        assert not bad, (label, bad)


@pytest.mark.parametrize("chart", CHARTS, ids=lambda p: p.name)
def test_rendered_manifests_are_valid_kubernetes_with_requests_and_non_root_pods(chart, built):
    for label, values in values_sets(chart):
        docs = render(built / chart.name, values, namespace=namespace_of(values))
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


def test_an_upgrade_never_deletes_or_breaks_the_run_job():
    """The run Job is named after `job.run`, not the revision: an upgrade with the same run
    renders the same Job (Helm leaves it, and the run in progress, alone); a new run is a new
    Job and the old one is kept (resource-policy keep), never deleted mid-run. Before the fix
    the Job was named after the revision and every `helm upgrade` deleted the running one."""
    chart = ROOT / "helm" / "coaflow-pipeline"
    values = dict(values_sets(chart))["job-values.yaml"]
    first, second = render(chart, values, revision=1), render(chart, values, revision=2)
    assert charts.upgrade_problems(first, second) == []
    jobs = lambda docs: {d["metadata"]["name"]: d for d in docs  # noqa: E731
                         if d["kind"] == "Job" and not charts.is_hook(d)}
    assert set(jobs(first)) == set(jobs(second)) == {"coaflow-pipeline-run-1"}
    run = jobs(first)["coaflow-pipeline-run-1"]
    assert run["metadata"]["annotations"][charts.KEEP] == "keep"
    assert "--run-id=coaflow-pipeline-1" in run["spec"]["template"]["spec"]["containers"][0]["args"]
    third = render(chart, {**values, "job": {**values["job"], "run": "2"}}, revision=3)
    assert set(jobs(third)) == {"coaflow-pipeline-run-2"}
    assert charts.upgrade_problems(second, third) == []  # run-1 stays (keep) and finishes
    off = render(chart, {**values, "job": {**values["job"], "enabled": False}}, revision=4)
    assert charts.upgrade_problems(third, off) == []
    ids = lambda docs: {(d["kind"], d["metadata"]["name"]) for d in docs  # noqa: E731
                        if d["kind"] != "Job"}
    assert ids(first) == ids(second) == ids(third)
    for doc in second + third:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # what the check catches: a Job named after the revision, without keep
    by_revision = [{**d, "metadata": {**d["metadata"], "annotations": {},
                                      "name": f"run-{r}"}} for r, d in ((1, run), (2, run))]
    assert charts.upgrade_problems(by_revision[:1], by_revision[1:]) == [
        "('Job', 'coaflow', 'run-1'): deleted by the upgrade"]


def test_the_cache_init_hook_runs_once_and_checks_the_volume_is_writable():
    """Post-install only (an upgrade never walks a full cache again), a deadline instead of a
    hang, no recursive chmod; it fails with the fix when uid 1000 cannot write (fsGroup not
    applied); initAsRoot instead gives the volume root to the user, with CHOWN/FOWNER only."""
    chart = ROOT / "helm" / "coaflow-pipeline"
    (hook,) = [d for d in render(chart, {}) if charts.is_hook(d)]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-install"
    assert hook["spec"]["activeDeadlineSeconds"] < 300  # Helm's default wait for a hook
    script = hook["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "chmod -R" not in script and "touch /data/coaflow/" in script
    assert "cannot write" in script and "initAsRoot" in script
    assert not [d for d in render(chart, {}, revision=2) if charts.is_hook(d) and
                "post-upgrade" in d["metadata"]["annotations"]["helm.sh/hook"]]
    (root,) = [d for d in render(chart, {"cache": {"initAsRoot": True}}) if charts.is_hook(d)]
    container = root["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"],
                                                            "add": ["CHOWN", "FOWNER"]}
    assert "chown 1000:1000 /data/coaflow" in container["command"][-1]
    kubernetes_validate.validate(root, KUBE_VERSION, strict=True)


def _rwx_check(tmp_path: Path, provisioner: str, modes: list[str]) -> None:
    """Render the chart's RWX check on a StorageClass as Helm's lookup returns it (a render
    without a cluster has no lookup: a copy of the chart calls the named template on it)."""
    chart = tmp_path / "chart"
    chart.mkdir(exist_ok=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: check\nversion: 0.1.0\n")
    (chart / "templates").mkdir(exist_ok=True)
    pipeline = ROOT / "helm" / "coaflow-pipeline"
    (chart / "templates" / "_helpers.tpl").write_text(
        (pipeline / "templates" / "_helpers.tpl").read_text())
    values = yaml.safe_load((pipeline / "values.yaml").read_text())
    values["cache"]["accessModes"] = modes
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    cls = {"metadata": {"name": "gp2"}, "provisioner": provisioner}
    (chart / "templates" / "check.yaml").write_text(
        '{{- include "coaflow-pipeline.checkStorageClass" (dict "class" (fromJson '
        f'{json.dumps(json.dumps(cls))}) "Values" .Values) }}}}\n')
    charts.render(chart, {}, name="t")


def test_a_read_write_once_storage_class_fails_the_install_with_the_fix(tmp_path):
    with pytest.raises(helm.HelmError, match=r"StorageClass \"gp2\" \(provisioner "
                       r"ebs.csi.aws.com\) makes ReadWriteOnce volumes only.*global.storageClass"):
        _rwx_check(tmp_path, "ebs.csi.aws.com", ["ReadWriteMany"])
    _rwx_check(tmp_path, "efs.csi.aws.com", ["ReadWriteMany"])  # RWX classes pass
    _rwx_check(tmp_path, "ebs.csi.aws.com", ["ReadWriteOnce"])  # a single-node cluster's choice
    pvc = [d for d in render(ROOT / "helm" / "coaflow-pipeline",
                             {"global": {"storageClass": "efs-sc"}}) if d["kind"] ==
           "PersistentVolumeClaim"]
    assert pvc[0]["spec"]["storageClassName"] == "efs-sc"
    assert pvc[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def _stage_pod_refs() -> set[tuple[str, str]]:
    """(kind, name) of every object the Airflow DAG's stage pods and the compiled KFP YAML
    refer to: ServiceAccounts, ConfigMaps, Secrets, PVCs."""
    from coaflow.contract import ORDER
    from coaflow.orchestrate import airflow as af
    from coaflow.orchestrate import airflow_pods as ap

    refs = set()
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    for stage in ORDER:
        pod = pod_manifest(ap.pod_spec(stage, settings, ["true"]))["spec"]
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
    for chart in SUBCHARTS:
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


def test_every_chart_reads_the_same_global_values():
    """One schema of `global` (the install's shared values): the umbrella's, which also makes
    the model name and the profile required, is each chart's."""
    umbrella = json.loads((UMBRELLA / "values.schema.json").read_text())["properties"]["global"]
    shared = {k: v for k, v in umbrella.items() if k != "required"}
    shared["properties"] = {**shared["properties"], "run": {
        k: v for k, v in umbrella["properties"]["run"].items() if k != "required"}}
    for chart in SUBCHARTS:
        schema = json.loads((chart / "values.schema.json").read_text())
        assert schema["properties"]["global"] == shared, chart.name
    assert umbrella["required"] == ["namespace", "images", "modelName", "run"]


def test_the_umbrella_refuses_an_install_without_a_model_or_in_another_namespace(built):
    umbrella = built / UMBRELLA.name
    with pytest.raises(helm.HelmValuesError, match="modelName"):
        charts.render(umbrella, {}, name="coaflow")
    values = dict(values_sets(UMBRELLA))["install-values.yaml"]
    with pytest.raises(helm.HelmError, match="install it with -n coaflow"):
        charts.render(umbrella, values, name="coaflow", namespace="default")


def test_pods_that_never_call_the_api_get_no_token_and_a_read_only_root(built):
    """Serving, tracking and the teacher mount no ServiceAccount token; every container of
    the install writes only to its volumes (/tmp, the model folders, the work volume)."""
    values = dict(values_sets(UMBRELLA))["install-values.yaml"]
    docs = charts.render(built / UMBRELLA.name, values, name="coaflow")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs
            if d["kind"] in ("Deployment", "Job")}
    assert set(pods) == {"coaflow-serving", "coaflow-tracking", "coaflow-teacher",
                         "coaflow-cache-init", "coaflow-run-1"}
    for name in ("coaflow-serving", "coaflow-tracking", "coaflow-teacher"):
        assert pods[name]["automountServiceAccountToken"] is False, name
    for name, spec in pods.items():
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (name, c["name"])


def test_the_umbrella_needs_an_mlflow(built):
    values = dict(values_sets(UMBRELLA))["external-values.yaml"]
    docs = charts.render(built / UMBRELLA.name, values, name="coaflow", namespace="ml-team")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert not [d for d in docs if "tracking" in d["metadata"]["name"]]
    without = {**values, "global": {**values["global"], "trackingUri": ""}}
    with pytest.raises(helm.HelmError, match="global.trackingUri"):
        charts.render(built / UMBRELLA.name, without, name="coaflow", namespace="ml-team")
