"""One Kubernetes settings file for both engines: for every stage, the Airflow DAG's pod and the
compiled Kubeflow task get the same image, CPU/memory (requests = limits), GPUs, /dev/shm, GPU
node selector and tolerations, PVC, secrets, MLflow ConfigMap and user."""

import pytest
import yaml

from coaflow.contract import ORDER
from coaflow.orchestrate import airflow as af
from coaflow.orchestrate import airflow_pods as ap
from coaflow.orchestrate import k8s as k8s_settings
from tests.pods import pod_manifest


@pytest.fixture(scope="module")
def kfp(tmp_path_factory):
    """The KFP pipeline compiled over every stage of ORDER (later stages faked as modules)."""
    from tests.components.test_coaflow_pipeline import _docs, _tasks, compile_full_pipeline

    mp = pytest.MonkeyPatch()
    try:
        spec, executors = _docs(compile_full_pipeline(mp, tmp_path_factory.mktemp("kfp") / "p.yaml"))
    finally:
        mp.undo()
    return spec, executors, _tasks(spec)


def _airflow(stage: str) -> dict:
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    return pod_manifest(ap.pod_spec(stage, settings, ["true"]))


@pytest.mark.parametrize("stage", ORDER)
def test_airflow_pods_and_kfp_tasks_agree(kfp, stage):
    spec, platform, tasks = kfp
    assert stage in tasks
    container = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
    ex = platform[f"exec-{stage}"]
    pod = _airflow(stage)
    base = pod["spec"]["containers"][0]
    res = base["resources"]
    assert container["image"] == base["image"]
    kres = container["resources"]
    assert (kres["resourceCpuRequest"], kres["resourceCpuLimit"]) == \
        (res["requests"]["cpu"], res["limits"]["cpu"])
    assert (kres["resourceMemoryRequest"], kres["resourceMemoryLimit"]) == \
        (res["requests"]["memory"], res["limits"]["memory"])
    gpus = res["limits"].get("nvidia.com/gpu")
    assert kres.get("accelerator", {}).get("resourceCount") == gpus
    shm = [v for v in pod["spec"]["volumes"] if v["name"] == "dshm"]
    kshm = ex.get("emptyDirMounts", [])
    assert [(v["emptyDir"]["medium"], v["emptyDir"]["sizeLimit"]) for v in shm] == \
        [(m["medium"], m["sizeLimit"]) for m in kshm]
    assert pod["spec"].get("nodeSelector") == (ex.get("nodeSelector") or {}).get("labels")
    assert [{k: t[k] for k in ("key", "operator", "effect")} for t in
            pod["spec"].get("tolerations") or []] == \
        [{k: t[k] for k in ("key", "operator", "effect")} for t in ex.get("tolerations", [])]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v] == [m["constant"] for m in ex["pvcMount"]]
    secrets = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"],
                e["name"]) for e in base["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    ksecrets = {(s["secretName"], kv["secretKey"], kv["envVar"]) for s in ex["secretAsEnv"]
                for kv in s["keyToEnv"]}
    assert secrets == ksecrets
    assert [e["configMapRef"]["name"] for e in base["envFrom"]] == \
        [c["configMapName"] for c in ex["configMapAsEnv"]]
    ctx = ex["securityContext"]
    assert (int(ctx["runAsUser"]), int(ctx["runAsGroup"]), ctx["runAsNonRoot"]) == \
        (base["securityContext"]["runAsUser"], base["securityContext"]["runAsGroup"], True)


def test_the_settings_ship_with_the_package_and_name_this_version():
    import coaflow

    text = k8s_settings.PACKAGED.read_text()
    ks = k8s_settings.load()
    assert ks.images.cpu.endswith(f":{coaflow.__version__}")
    assert ks.images.gpu.endswith(f":{coaflow.__version__}")
    assert "orchestrate/k8s.yaml" in (k8s_settings.PACKAGED.parents[3] / "pyproject.toml").read_text()
    assert yaml.safe_load(text)["resources"]["sft"]["gpus"] >= 1


def test_a_bad_field_names_the_file_and_field(tmp_path):
    data = yaml.safe_load(k8s_settings.PACKAGED.read_text())
    data["resources"]["sft"]["gpus"] = -1
    bad = tmp_path / "k8s.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(k8s_settings.UserError, match=f"{bad}: resources.sft.gpus"):
        k8s_settings.load(env={"COAFLOW_K8S_CONFIG": str(bad)})
