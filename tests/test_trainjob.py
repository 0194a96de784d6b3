"""The Kubeflow Trainer TrainJob of a multi-node sft: valid against the Trainer's API models
(kubeflow-trainer-api 2.3.0, the Kubeflow SDK 0.5's), the unchanged stage command under
torchrun, and the same image, resources, secrets, PVC, /dev/shm and GPU placement as the
stage's single pod (one Kubernetes settings file)."""

import pytest

from coaflow.orchestrate import airflow as af
from coaflow.orchestrate import k8s as k8s_settings
from coaflow.orchestrate import trainjob
from tests import requires
from tests.pods import pod_manifest

api = requires.module("kubeflow_trainer_api")

ARGS = ["--config", "qwen3-0.6b-1gpu", "--out", "/data/coaflow/runs/r1/sft",
        "--input", "gate=/data/coaflow/runs/r1/gate", "--set", "sft.batch_size=2"]


def _job() -> dict:
    return trainjob.manifest("sft", ARGS, k8s_settings.load(), nodes=2, gpus_per_node=8,
                             name="coaflow-r1-sft", run_id="r1")


def test_the_trainjob_is_valid_against_the_trainer_api_models():
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = _job()
    parsed = TrainerV1alpha1TrainJob.from_dict(job)
    assert parsed.to_dict() == job  # every field known to the API, with the right types
    bad = _job()
    bad["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValueError):
        TrainerV1alpha1TrainJob.from_dict(bad)


def test_it_runs_the_stage_command_under_torchrun_with_the_stage_pods_settings():
    job = _job()
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert trainer["command"][:5] == ["torchrun", "-m", "coaflow.launch", "stage", "sft"]
    assert trainer["command"][5:] == ARGS
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
    pod = pod_manifest(af.pod_spec("sft", settings, ["true"]))["spec"]
    base = pod["containers"][0]
    assert trainer["image"] == base["image"]
    limits = trainer["resourcesPerNode"]["limits"]
    assert (limits["cpu"], limits["memory"]) == (base["resources"]["limits"]["cpu"],
                                                 base["resources"]["limits"]["memory"])
    assert limits["nvidia.com/gpu"] == "8"
    secrets = {e["name"] for e in base["env"] if "valueFrom" in e}
    assert secrets <= {e["name"] for e in trainer["env"]}
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    node = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert node["nodeSelector"] == pod["nodeSelector"]
    assert node["tolerations"][0]["key"] == pod["tolerations"][0]["key"]
    assert {v["name"] for v in node["volumes"]} == {v["name"] for v in pod["volumes"]}
    assert node["serviceAccountName"] == pod["serviceAccountName"]


def test_a_bad_size_names_the_stage():
    with pytest.raises(ValueError, match="sft: nodes"):
        trainjob.manifest("sft", [], k8s_settings.load(), nodes=0, gpus_per_node=1, name="x")
