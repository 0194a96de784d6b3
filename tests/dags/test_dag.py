"""The DAG as Airflow loads it: no import errors, a task per stage in pipeline order, the
trigger form, retries only for the retryable exit code, the promotion branch, and pod specs that
the Kubernetes schema accepts (kubernetes mode, no cluster)."""

from __future__ import annotations

import json

import pytest

from coaflow.contract import ORDER
from coaflow.orchestrate import airflow as af
from coaflow.orchestrate import airflow_pods as ap
from tests.dags.conftest import airflow_env, python
from tests.pods import pod_manifest

INSPECT = r"""
import json, os, time
from airflow.dag_processing.dagbag import DagBag

def load(**env):
    os.environ.update(env)
    start = time.perf_counter()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    seconds = time.perf_counter() - start
    dag = bag.dags.get("coaflow_retrain")
    info = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "seconds": seconds}
    if dag is None:
        return info
    info.update(
        tags=sorted(dag.tags), catchup=dag.catchup, max_active_runs=dag.max_active_runs,
        schedule=str(dag.schedule), doc=dag.doc_md or "", owner=dag.owner,
        order=[t.task_id for t in dag.topological_sort()],
        tasks={t.task_id: {"down": sorted(t.downstream_task_ids), "retries": t.retries,
                           "backoff": t.retry_exponential_backoff, "type": type(t).__name__,
                           "callback": [c.__name__ for c in (t.on_failure_callback or [])]
                           if isinstance(t.on_failure_callback, list)
                           else getattr(t.on_failure_callback, "__name__", None)}
               for t in dag.tasks},
        params={k: {"default": dag.params.get_param(k).value, "schema": dag.params.get_param(k).schema,
                    "description": dag.params.get_param(k).description} for k in dag.params})
    from airflow.serialization.serialized_objects import DagSerialization  # as the scheduler
    info["serialized"] = sorted(t.task_id for t in DagSerialization.from_dict(
        DagSerialization.to_dict(dag)).tasks)
    bad = {}
    for name, value in [("deploy_target", "moon"), ("epochs", -1), ("tasks_per_suite", {"kbqa": "x"}),
                        ("seed", "abc")]:
        if name in dag.params:
            try:
                dag.params.get_param(name).resolve(value=value)
                bad[name] = None
            except Exception as e:
                bad[name] = f"{type(e).__name__}: {e}"
    info["bad"] = bad
    if os.environ.get("COAFLOW_AIRFLOW_MODE") == "kubernetes":  # the pod as the operator sends it
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from coaflow.orchestrate import airflow as af
        from coaflow.orchestrate import airflow_pods as ap
        KubernetesHook.is_in_cluster = property(lambda self: True)  # a label; asks the cluster
        plan = {"profile": "tiny", "overrides": ["run.workdir=/data/coaflow"], "run_id": "r1",
                "run_dir": "/data/coaflow/runs/r1"}
        op = dag.get_task("sft")
        command = ap.pod_command("sft", plan, {"gate": plan["run_dir"] + "/gate"})
        for key, value in ap.run_args(command, "r1", op.env_vars).items():  # as execute() does
            setattr(op, key, value)
        pod = op.build_pod_request_obj()
        for callback in op.callbacks:  # as the operator calls them before creating the pod
            callback.on_pod_manifest_created(pod_request=pod, client=None, mode="sync",
                                             operator=op, context={})
        from kubernetes.client import ApiClient
        info["pod"] = ApiClient().sanitize_for_serialization(pod)
        info["pod_spec"] = ApiClient().sanitize_for_serialization(
            ap.pod_spec("sft", af.load_settings(), command, "r1"))
        # a failed pod as the provider reports it, without a cluster: which codes are retried
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.sdk.exceptions import AirflowException
        from kubernetes.client import models as k8s

        def provider_failure(self, pod, remote_pod):
            raise AirflowException("Pod returned a failure.")

        KubernetesPodOperator.cleanup = provider_failure
        info["cleanup"] = {}
        for code in (75, 3, 1, None):
            state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code)
                                         ) if code is not None else None
            remote = k8s.V1Pod(status=k8s.V1PodStatus(container_statuses=[k8s.V1ContainerStatus(
                name="base", image="i", image_id="", ready=False, restart_count=0, state=state)]))
            try:
                op.cleanup(None, remote)
            except Exception as e:
                info["cleanup"][str(code)] = type(e).__name__
    return info

out = {"local": load()}
out["full"] = load(COAFLOW_AIRFLOW_MODE="kubernetes")
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    return python(INSPECT, airflow_env(home, home / "work"))


def test_dagbag_loads_without_errors_and_fast(info):
    assert info["local"]["errors"] == {}
    assert info["full"]["errors"] == {}
    assert info["local"]["seconds"] < 1.0  # the DAG file only wires; parsed again and again
    for mode in ("local", "full"):  # the scheduler and the UI read the serialized DAG
        assert info[mode]["serialized"] == sorted(info[mode]["tasks"])


def test_a_task_per_stage_in_pipeline_order(info):
    dag = info["local"]
    stages = [t for t in dag["order"] if t in ORDER]
    assert stages == list(ORDER)  # every stage has its task, in order
    assert dag["order"][0] == "configure"
    for a, b in zip(stages, stages[1:], strict=False):  # directly, or through the branch
        down = dag["tasks"][a]["down"]
        assert b in down or (down == ["promotion"] and b in dag["tasks"]["promotion"]["down"])
    assert dag["schedule"] == "None"  # COAFLOW_AIRFLOW_SCHEDULE=none: trigger-only
    assert dag["catchup"] is False and dag["max_active_runs"] == 1
    assert "coaflow" in dag["tags"] and dag["owner"] == "mlops"
    assert "promotion" in dag["doc"]


def test_retries_with_backoff_and_a_failure_callback_on_every_stage(info):
    for name in ORDER:
        task = info["local"]["tasks"][name]
        assert task["retries"] == 3 and task["backoff"] is True
        assert "record_failure" in str(task["callback"])
    assert info["local"]["tasks"]["configure"]["retries"] == 0  # bad params: no point retrying


def test_trigger_form(info):
    params = info["local"]["params"]
    assert params["profile"]["default"] == "default"
    for name in ("seed", "base_model", "teacher", "teacher_base_url", "teacher_model",
                 "tasks_per_suite", "epochs", "overrides"):
        assert name in params and params[name]["description"], name
    full = info["full"]["params"]
    assert full["promote"]["default"] is True and full["promote"]["schema"]["type"] == "boolean"
    assert full["deploy_target"]["schema"]["enum"] == ["local", "kubernetes", "none"]
    bad = info["full"]["bad"]
    assert all(bad[k] and "ParamValidationError" in bad[k] for k in bad), bad


def test_the_form_shows_what_it_sends(info):
    """What the UI does with the schemas: ``profile`` is a dropdown of the shipped profiles; the
    teacher's empty choice reads "(the profile's)", not "null"; ``tasks_per_suite`` starts as
    the {} the JSON field shows; only a param whose type excludes null and whose default is null
    is marked required, and none is."""
    params = info["local"]["params"]
    assert params["profile"]["schema"]["enum"] == af.shipped_profiles()
    assert {"default", "tiny", "smoke", "qwen3-0.6b-1gpu"} <= set(params["profile"]["schema"]["enum"])
    assert params["teacher"]["schema"]["values_display"]["null"] == "(the profile's)"
    assert params["tasks_per_suite"]["default"] == {}
    for name, p in {**params, **info["full"]["params"]}.items():
        types = p["schema"].get("type")
        nullable = isinstance(types, list) and "null" in types
        assert nullable or p["default"] is not None, f"{name} is required in the form"
    assert "null" in params["overrides"]["schema"]["type"]
    assert af.overrides_from_params({"tasks_per_suite": {}, "seed": 0}, ["synthesize"]) == \
        ["run.seed=0"]  # {} is the profile's, like null; 0 is a value


def test_promotion_branch_gates_deploy(info):
    full = info["full"]
    assert [t for t in full["order"] if t in ORDER] == list(ORDER)
    tasks = full["tasks"]
    assert tasks["register"]["down"] == ["promotion"]
    assert tasks["promotion"]["down"] == ["deploy", "not_promoted"]
    assert tasks["promotion"]["type"].startswith("_Branch")
    assert tasks["sft"]["type"] == "CoaflowPodOperator"  # kubernetes mode


def test_params_become_overrides_checked_against_the_config():
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_WORKDIR": "/srv/w"})
    plan = af.plan({"profile": "tiny", "seed": 7, "tasks_per_suite": {"kbqa": 5, "calc": 1},
                    "epochs": 1.5, "promote": False, "overrides": ["sft.lr=0.001"]},
                   "manual__2026-11-30T20:40:00+00:00", settings, ["synthesize", "gate", "sft"])
    assert plan["overrides"] == ["run.workdir=/srv/w", "run.seed=7",
                                 'synthesize.suites={"kbqa": 5, "calc": 1}', "sft.epochs=1.5",
                                 "sft.lr=0.001"]  # promote: no register stage, no override
    assert plan["run_dir"] == "/srv/w/runs/manual__2026-11-30T20-40-00-00-00"
    argv = af.task_argv("sft", plan, {"gate": plan["run_dir"] + "/gate"})
    assert argv[:5] == ["coaflow", "stage", "sft", "--config", "tiny"]
    assert argv[-2:] == ["--input", f"gate={plan['run_dir']}/gate"]
    for params, words in [({"overrides": ["sft.epochz=2"]}, "sft.epochz"),
                          ({"profile": "nope"}, "unknown profile"),
                          ({"overrides": ["no-equals"]}, "section.key=value"),
                          ({"tasks_per_suite": {"kbqa": -1}}, "synthesize.suites")]:
        with pytest.raises(af.UserError, match=words):
            af.plan(params, "r", settings, ["synthesize", "gate", "sft"])


def test_settings_errors_name_the_field(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("mode: cloud\n")
    with pytest.raises(af.UserError, match="mode"):
        af.load_settings(bad, env={})
    assert af.load_settings(bad, env={"COAFLOW_AIRFLOW_MODE": "kubernetes"}).mode == "kubernetes"
    old = tmp_path / "old.yaml"
    old.write_text("kubernetes: {namespace: x}\n")  # the pod settings live in one shared file
    with pytest.raises(af.UserError, match="kubernetes: the pod settings moved"):
        af.load_settings(old, env={})


def test_a_missing_settings_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "dags" / "coaflow_retrain.yaml"
    with pytest.raises(af.UserError, match=f"{missing}: the DAG's settings file is missing"):
        af.load_settings(env={}, default=missing)
    with pytest.raises(af.UserError, match="k8s.yaml: Kubernetes settings file not found"):
        af.load_settings(env={"COAFLOW_K8S_CONFIG": str(tmp_path / "k8s.yaml")})


def test_exit_codes_decide_retry_fail_or_success(tmp_path):
    from coaflow.contract import Result

    assert [af.outcome(c) for c in (0, 4, 75, 1, 2, 3)] == ["ok", "refused", "retry", "fail",
                                                            "fail", "fail"]

    out = tmp_path / "register"
    out.mkdir()
    (out / "result.json").write_text(json.dumps(Result(summary={"promoted": False}).to_json()))
    assert af.xcom_value("register", out, 4)["promoted"] is False
    assert af.xcom_value("register", out, 0)["promoted"] is False  # promote=false: no move
    assert af.xcom_value("gate", tmp_path / "none", 0) == {
        "stage": "gate", "dir": str(tmp_path / "none"), "exit_code": 0, "result": {},
        "promoted": True}


def _validate(manifest: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(manifest, "1.30.0", strict=True)


@pytest.mark.parametrize("stage", ["synthesize", "sft"])
def test_pod_specs_pass_the_kubernetes_schema(stage):
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    plan = {"profile": "qwen3-0.6b-1gpu", "overrides": ["run.workdir=/data/coaflow"],
            "run_id": "manual__x", "run_dir": "/data/coaflow/runs/manual__x"}
    command = ap.pod_command(stage, plan, {"gate": "/data/coaflow/runs/manual__x/gate"})
    manifest = pod_manifest(ap.pod_spec(stage, settings, command, "manual__x"))
    _validate(manifest)
    c = manifest["spec"]["containers"][0]
    assert c["image"] == settings.kubernetes.image_for(stage) and c["name"] == "base"
    assert c["image"] == (settings.kubernetes.images.gpu if stage == "sft"
                          else settings.kubernetes.images.cpu)  # CPU stages: the CPU image
    ctx = {**manifest["spec"]["securityContext"], **c["securityContext"]}  # PSS "restricted"
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    assert c["command"][:2] == ["/bin/sh", "-c"]
    assert f"coaflow stage {stage} --config qwen3-0.6b-1gpu --out /data/coaflow/runs/manual__x/" \
           f"{stage}" in c["command"][2]
    assert "> /airflow/xcom/return.json" in c["command"][2]
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "coaflow-secrets", "key": "openai-api-key", "optional": True}}} in c["env"]
    assert c["envFrom"] == [{"configMapRef": {"name": "coaflow-mlflow"}}]
    assert {"name": "work", "mountPath": "/data/coaflow"} in c["volumeMounts"]
    assert {"name": "work", "persistentVolumeClaim": {"claimName": "coaflow-work"}} in \
        manifest["spec"]["volumes"]
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    if stage == "sft":
        assert gpu == "1" and c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert manifest["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert manifest["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    else:
        assert gpu is None and "nodeSelector" not in manifest["spec"]


def test_the_operator_renders_a_valid_pod_with_the_xcom_sidecar(info):
    pod = info["full"]["pod"]
    _validate(pod)
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["base", "airflow-xcom-sidecar"]
    sidecar = pod["spec"]["containers"][1]
    assert "@sha256:" in sidecar["image"] and sidecar["image"].startswith("alpine:3.")
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    base = pod["spec"]["containers"][0]
    assert base["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--input gate=/data/coaflow/runs/r1/gate" in base["command"][2]
    assert pod["metadata"]["namespace"] == "coaflow"


def test_the_operator_sends_the_pod_that_pod_spec_describes(info):
    """The checks of the pod that need no Airflow (schemas, Helm values, Pod Security) read
    ``pod_spec``; the operator renders the pod from the same documented arguments. Apart from
    what the provider adds (its XCom volume and sidecar, a name, its own labels and defaults)
    they are one pod."""
    sent, described = info["full"]["pod"], info["full"]["pod_spec"]
    base, ours = sent["spec"]["containers"][0], described["spec"]["containers"][0]
    for key, value in ours.items():
        if key == "volumeMounts":
            assert [m for m in base[key] if m["name"] != "xcom"] == value, key
        else:
            assert base[key] == value, key
    for key, value in described["spec"].items():
        if key == "volumes":
            assert [v for v in sent["spec"][key] if v["name"] != "xcom"] == value, key
        elif key != "containers":
            assert sent["spec"][key] == value, key
    assert described["metadata"]["labels"].items() <= sent["metadata"]["labels"].items()


def test_a_failed_pod_is_retried_only_for_exit_75_or_a_lost_pod(info):
    assert info["full"]["cleanup"] == {"75": "AirflowException", "3": "AirflowFailException",
                                       "1": "AirflowFailException", "None": "AirflowException"}


def test_a_broken_pod_spec_is_caught_by_the_schema():
    import kubernetes_validate

    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    manifest = pod_manifest(ap.pod_spec("sft", settings, ["true"]))
    manifest["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = ["1"]
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(manifest)


def test_the_pod_writes_the_xcom_and_a_refusal_exits_zero(tmp_path):
    """Run the pod's shell command here, with a fake ``coaflow`` that exits like register."""
    import os
    import subprocess
    import sys

    out = tmp_path / "runs" / "r" / "register"
    out.mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"summary": {"promoted": False}}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("coaflow", "exit $CODE"), ("python", f'exec {sys.executable} "$@"')]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    plan = {"profile": "tiny", "overrides": [], "run_id": "r", "run_dir": str(tmp_path / "runs/r")}
    script = ap.pod_command("register", plan, {})[2].replace(ap.XCOM_FILE,
                                                             str(tmp_path / "xcom.json"))
    script = script.replace("mkdir -p /airflow/xcom", f"mkdir -p {tmp_path}")
    for code, want in [(4, 0), (75, 75), (3, 3), (0, 0)]:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CODE": str(code)}
        rc = subprocess.run(["/bin/sh", "-c", script], env=env).returncode
        assert rc == want
        xcom = json.loads((tmp_path / "xcom.json").read_text())
        assert xcom["exit_code"] == code and xcom["dir"] == str(out)
        assert xcom["promoted"] is False


def test_failure_callback_tags_the_run_in_mlflow(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_WORKDIR": str(tmp_path)})
    plan = af.plan({}, "manual__2026-11-30T21:00:00+00:00", settings, list(ORDER))

    class TI:
        task_id = "gate"

        def xcom_pull(self, task_ids):
            return plan if task_ids == "configure" else None

    af.record_failure({"ti": TI(), "exception": RuntimeError("stage gate exited 3 (refused)"),
                       "run_id": "manual__2026-11-30T21:00:00+00:00"})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("coaflow").experiment_id])
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["coaflow.failed_stage"] == "gate" and tags["coaflow.status"] == "failed"
    assert tags["coaflow.run_id"] == plan["run_id"] and "exited 3" in tags["coaflow.error"]
    af.record_failure({"ti": None})  # a broken context is reported, never raised


def test_airflow_and_kubeflow_read_the_same_secret():
    """One Secret for both orchestrators (helm/coaflow-pipeline creates it): the DAG's stage pods
    and the KFP components map the same keys to the same variables."""
    import yaml

    from coaflow.orchestrate import k8s

    ((SECRET, SECRET_ENV),) = k8s.load().secret_env().items()
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    dag = {(s.secret, s.key, s.env) for s in settings.kubernetes.secrets}
    assert dag == {(SECRET, k, v) for k, v in SECRET_ENV.items()}
    root = __import__("pathlib").Path(__file__).parents[2]
    chart = yaml.safe_load((root / "helm/coaflow-pipeline/values.yaml").read_text())["secrets"]
    assert chart["name"] == SECRET and chart["env"] == SECRET_ENV
