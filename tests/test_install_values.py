"""The install's one values file (helm/coaflow) on the engines' side: the stage pods' settings it
implies (``coaflow.orchestrate.k8s.load``), the overrides every run starts from, the same as the
charts derive, the KFP pipeline compiled with ``--values``, the Airflow DAG reading it, and the
TrainJob of a KFP launcher going to the launcher's own namespace."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coaflow.orchestrate import k8s
from tests import charts

ROOT = Path(__file__).resolve().parents[1]
VALUES = {
    "global": {"namespace": "ml", "images": {"registry": "reg.example.com/x", "tag": "2.0.0",
                                             "pullPolicy": "Always"},
               "gpu": {"nodeSelector": {"pool": "h100"}, "tolerations": []},
               "modelName": "support-agent",
               "run": {"profile": "qwen3-0.6b-1gpu", "overrides": ["sft.epochs=1"]},
               "teacher": {"model": "Qwen/Qwen3-8B"}},
    "pods": {"shm_size": "32Gi"},
    "coaflow-pipeline": {"teacher": {"enabled": True}, "cache": {"name": "work"},
                         "secrets": {"name": "ml-secrets"}},
}


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_values_file_drives_the_stage_pods_settings(tmp_path):
    ks = k8s.load(write(tmp_path, VALUES))
    assert ks.namespace == "ml" and ks.image_pull_policy == "Always"
    assert (ks.images.cpu, ks.images.gpu) == ("reg.example.com/x/coaflow-cpu:2.0.0",
                                              "reg.example.com/x/coaflow-gpu:2.0.0")
    assert (ks.gpu_node_selector, ks.gpu_tolerations) == ({"pool": "h100"}, [])
    assert ks.pvc == "work" and {s.secret for s in ks.secrets} == {"ml-secrets"}
    assert ks.shm_size == "32Gi"  # a pods: key; the rest keep k8s.yaml's defaults
    assert ks.resources == k8s.load().resources
    assert ks.profile == "qwen3-0.6b-1gpu"
    assert ks.overrides == [
        "run.name=support", "deploy.target=kubernetes", "deploy.kubernetes.namespace=ml",
        "deploy.kubernetes.deployment=coaflow-serving",
        "deploy.kubernetes.service_url=http://coaflow-serving.ml:8000/v1",
        "synthesize.llm.base_url=http://coaflow-teacher.ml:8000/v1",
        "synthesize.llm.model=Qwen/Qwen3-8B", "sft.epochs=1"]
    # the same file through the variable both engines read
    assert k8s.load(env={k8s.ENV_VAR: str(tmp_path / "values.yaml")}) == ks


def test_the_runs_get_the_registered_model_deploy_target_and_teacher(tmp_path):
    """Before: the documented profile deployed `local` inside its own pod, to a model the
    serving chart did not serve, with a teacher no one deployed."""
    from coaflow.config import load_config
    from coaflow.registry import model_name

    ks = k8s.load(write(tmp_path, VALUES))
    cfg = load_config(ks.profile, ks.overrides)
    assert model_name(cfg.run.name) == "support-agent"
    assert cfg.deploy.target == "kubernetes" and cfg.deploy.kubernetes.namespace == "ml"
    assert cfg.synthesize.llm.base_url == "http://coaflow-teacher.ml:8000/v1"
    bare = load_config("qwen3-0.6b-1gpu")  # no values file: the chart's teacher Service
    assert bare.synthesize.llm.base_url == "http://coaflow-teacher:8000/v1"


@pytest.mark.parametrize("values, match", [
    ({"global": {"modelName": "support"}}, "global.modelName: 'support' must end in '-agent'"),
    ({"global": {"teacher": {"url": "http://x/v1"}},
      "coaflow-pipeline": {"teacher": {"enabled": True}}}, "not both"),
    ({"global": {}, "pods": {"namespace": "x"}}, "pods.namespace: set by the charts' values"),
    ({"global": {}, "pods": {"shm_size": 3}}, "shm_size"),
])
def test_a_bad_values_file_is_one_line_naming_the_field(tmp_path, values, match):
    with pytest.raises(k8s.UserError, match=match):
        k8s.load(write(tmp_path, values))


def chart_overrides(tmp_path: Path, values: dict) -> list[str]:
    """The overrides helm/coaflow-pipeline's whole-run Job gets from the same values."""
    job = {**values.get("coaflow-pipeline", {}), "global": values["global"],
           "job": {"enabled": True}}
    docs = charts.render(ROOT / "helm" / "coaflow-pipeline", job, name="coaflow",
                         namespace=values["global"].get("namespace", "coaflow"))
    (run,) = [d for d in docs if d["kind"] == "Job" and not charts.is_hook(d)]
    args = run["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a.removeprefix("--set=") for a in args if a.startswith("--set=")]


@pytest.mark.parametrize("variant", ["deployed teacher", "teacher endpoint", "no teacher",
                                     "no model name"])
def test_the_chart_and_the_engines_derive_the_same_overrides(tmp_path, variant):
    values = yaml.safe_load(yaml.safe_dump(VALUES))
    if variant != "deployed teacher":
        values["coaflow-pipeline"]["teacher"] = {"enabled": False}
    if variant == "teacher endpoint":
        values["global"]["teacher"]["url"] = "https://llm.example.com/v1"
    if variant == "no model name":
        del values["global"]["modelName"]
    assert chart_overrides(tmp_path, values) == k8s.load(write(tmp_path, values)).overrides


def test_the_cli_prints_the_settings_and_the_airflow_charts_values(tmp_path):
    path = write(tmp_path, VALUES)
    out = subprocess.run([sys.executable, "-m", "coaflow.orchestrate.k8s", "--values", str(path)],
                         capture_output=True, text=True, check=True).stdout
    derived = tmp_path / "k8s.yaml"
    derived.write_text(out)
    assert k8s.load(derived) == k8s.load(path)  # the ConfigMap's file = the values' settings
    chart = yaml.safe_load(subprocess.run(
        [sys.executable, "-m", "coaflow.orchestrate.k8s", "--values", str(path),
         "--airflow-chart"], capture_output=True, text=True, check=True).stdout)
    assert chart["images"]["airflow"] == {"repository": "reg.example.com/x/coaflow-airflow",
                                          "tag": "2.0.0", "pullPolicy": "Always"}
    assert chart["airflowVersion"] == "3.3.2"
    assert {"name": "COAFLOW_AIRFLOW_MODE", "value": "kubernetes"} in chart["env"]
    bad = subprocess.run([sys.executable, "-m", "coaflow.orchestrate.k8s", "--values",
                          str(write(tmp_path, {"global": {"modelName": "x"}}))],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "modelName" in bad.stderr


def test_the_airflow_dag_takes_the_values_profile_and_overrides(tmp_path):
    from coaflow.orchestrate import airflow as af
    from coaflow.orchestrate import airflow_pods as ap

    env = {k8s.ENV_VAR: str(write(tmp_path, VALUES)), "COAFLOW_AIRFLOW_MODE": "kubernetes"}
    settings = af.load_settings(env=env)
    assert settings.profile == "qwen3-0.6b-1gpu"
    stages = ["synthesize", "gate", "sft", "rl", "evaluate", "register", "deploy"]
    assert af.trigger_params(settings, stages)["deploy_target"]["default"] == "kubernetes"
    plan = af.plan({}, "manual__1", settings, stages)
    assert plan["overrides"][1:len(settings.kubernetes.overrides) + 1] == \
        settings.kubernetes.overrides
    pod = ap.pod_spec("sft", settings, ["true"])
    assert pod.metadata.namespace == "ml"
    assert pod.spec.containers[0].image == "reg.example.com/x/coaflow-gpu:2.0.0"
    # COAFLOW_AIRFLOW_PROFILE still wins; local mode ignores the cluster's overrides
    assert af.load_settings(env={**env, "COAFLOW_AIRFLOW_PROFILE": "smoke"}).profile == "smoke"
    local = af.load_settings(env={**env, "COAFLOW_AIRFLOW_MODE": "local"})
    assert not any(o.startswith("deploy.") for o in af.plan({}, "m", local, stages)["overrides"])


def test_kfp_compiles_with_the_values_and_every_task_starts_from_its_overrides(tmp_path):
    path = write(tmp_path, VALUES)
    out = tmp_path / "p.yaml"
    subprocess.run([sys.executable, "-m", "components.coaflow_pipeline", "--values", str(path),
                    "--output", str(out)], check=True, cwd=ROOT, capture_output=True)
    spec, platform = yaml.safe_load_all(out.read_text())
    ks = k8s.load(path)
    assert spec["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == ks.profile
    tasks = spec["root"]["dag"]["tasks"]
    consts = {n: t["inputs"]["parameters"]["site"]["runtimeValue"]["constant"]
              for n, t in tasks.items() if "site" in t["inputs"]["parameters"]}
    assert consts and all(c == ks.overrides for c in consts.values())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {ks.images.cpu, ks.images.gpu}
    missing = subprocess.run([sys.executable, "-m", "components.coaflow_pipeline", "--values",
                              str(tmp_path / "nope.yaml")], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr


def test_a_run_starts_from_the_site_overrides_before_its_own(tmp_path, monkeypatch):
    """run_component puts the compiled constant first: a run's own overrides add to it."""
    from coaflow.orchestrate import kfp as kfp_engine

    seen = []

    def call(argv, env):
        seen.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text('{"metrics": {}}')
        return 0

    monkeypatch.setattr(kfp_engine.subprocess, "call", call)
    kfp_engine.run_component("gate", profile="tiny", overrides=["gate.dedup=false"], seed=1,
                             workdir="/w", tracking_uri="", retries=0, out=str(tmp_path / "o"),
                             inputs={}, site=["run.name=x", "deploy.target=kubernetes"])
    sets = [seen[0][i + 1] for i, a in enumerate(seen[0]) if a == "--set"]
    assert sets[:3] == ["run.name=x", "deploy.target=kubernetes", "gate.dedup=false"]


def test_a_kfp_launcher_submits_its_trainjob_to_its_own_namespace(tmp_path, monkeypatch):
    """Before: the namespace compiled into the settings (coaflow), where a Kubeflow profile's
    run has no RBAC and another volume."""
    from coaflow.orchestrate import kfp as kfp_engine
    from coaflow.orchestrate import trainjob

    seen = []
    monkeypatch.setattr(trainjob, "launch", lambda stage, **kw: seen.append(kw["ks"]) or 1)
    monkeypatch.setenv("COAFLOW_NAMESPACE", "kubeflow-user-example-com")
    settings = k8s.load().model_dump(mode="json", exclude={"profile", "overrides"})
    code = kfp_engine._launch("sft", {"nodes": 2, "gpus_per_node": 8, "settings": settings})
    assert code == 1 and seen[0].namespace == "kubeflow-user-example-com"
    assert k8s.load().namespace == "coaflow"


def test_what_the_values_file_leaves_out_the_charts_and_engines_default_alike(tmp_path):
    """A key missing from the user's file: Helm takes helm/coaflow's values.yaml, the engines
    coaflow's packaged k8s.yaml (the image has no helm/); the two must say the same."""
    umbrella = yaml.safe_load((ROOT / "helm" / "coaflow" / "values.yaml").read_text())
    minimal = {"global": {"modelName": "m-agent", "run": {"profile": "default"}}}
    ks = k8s.load(write(tmp_path, minimal))
    full = k8s.load(write(tmp_path, charts_merge(umbrella, minimal)))
    assert ks == full
    g = umbrella["global"]
    assert ks.images.gpu == f"{g['images']['registry']}/coaflow-gpu:{g['images']['tag']}"
    assert g["teacher"]["model"] == k8s.TEACHER_MODEL
    pipeline = yaml.safe_load((ROOT / "helm" / "coaflow-pipeline" / "values.yaml").read_text())
    assert pipeline["rbac"]["deploy"]["deployments"][0] == k8s.SERVING
    assert umbrella["coaflow-serving"]["fullnameOverride"] == k8s.SERVING


def charts_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = charts_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out
