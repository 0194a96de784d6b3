"""The Kubeflow Trainer TrainJob of a multi-node sft: valid against the Trainer's API models
(kubeflow-trainer-api 2.3.0, the Kubeflow SDK 0.5's), the unchanged stage command under
torchrun, and the same image, resources, secrets, PVC, /dev/shm and GPU placement as the
stage's single pod (one Kubernetes settings file)."""

import re

import pytest

from coaflow.orchestrate import airflow as af
from coaflow.orchestrate import airflow_pods as ap
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
    pod = pod_manifest(ap.pod_spec("sft", settings, ["true"]))["spec"]
    base = pod["containers"][0]
    assert trainer["image"] == base["image"]
    limits = trainer["resourcesPerNode"]["limits"]
    # the 1-GPU pod's resources are per GPU process: a node of 8 GPUs gets 8 times as much
    assert (limits["cpu"], limits["memory"]) == (
        k8s_settings.scale(base["resources"]["limits"]["cpu"], 8),
        k8s_settings.scale(base["resources"]["limits"]["memory"], 8))
    assert limits["nvidia.com/gpu"] == "8"
    secrets = {e["name"] for e in base["env"] if "valueFrom" in e}
    assert secrets <= {e["name"] for e in trainer["env"]}
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    node = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert node["nodeSelector"] == pod["nodeSelector"]
    assert node["tolerations"][0]["key"] == pod["tolerations"][0]["key"]
    assert {v["name"] for v in node["volumes"]} == {v["name"] for v in pod["volumes"]}
    assert node["serviceAccountName"] == pod["serviceAccountName"]
    template = patch["replicatedJobs"][0]["template"]["spec"]["template"]
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_a_bad_size_names_the_stage():
    with pytest.raises(ValueError, match="sft: nodes"):
        trainjob.manifest("sft", [], k8s_settings.load(), nodes=0, gpus_per_node=1, name="x")


# --- the launch step: submit -> wait -> logs -> exit code, against a fake API ---------------

class FakeApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"({status})")
        self.status = status


def _pod(name: str, index: int, exit_code: int | None = None):
    from kubernetes.client import models as km

    state = km.V1ContainerState(terminated=km.V1ContainerStateTerminated(exit_code=exit_code)
                                if exit_code is not None else None)
    return km.V1Pod(
        metadata=km.V1ObjectMeta(name=name, labels={trainjob.JOBSET_LABEL: "job",
                                                    trainjob.INDEX_LABEL: str(index)}),
        status=km.V1PodStatus(container_statuses=[km.V1ContainerStatus(
            name="node", image="img", image_id="", ready=False, restart_count=0, state=state)]))


class FakeCluster:
    """CustomObjectsApi + CoreV1Api: a TrainJob goes through ``states`` one poll at a time;
    rank 0's log grows by a line a poll; ``on_done`` plays the nodes (writes the stage folder)."""

    def __init__(self, states, logs=None, exit_codes=(None, None), existing=None, on_done=None):
        self.states, self.polls, self.jobs, self.calls = list(states), 0, {}, []
        self.logs = logs or {}
        self.exit_codes, self.on_done = exit_codes, on_done
        if existing is not None:
            self.jobs[existing["metadata"]["name"]] = existing

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.calls.append(("create", body["metadata"]["name"]))
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        if body["metadata"]["name"] in self.jobs:
            raise FakeApiError(409)
        self.jobs[body["metadata"]["name"]] = body

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if name not in self.jobs:
            raise FakeApiError(404)
        job = self.jobs[name]
        if "status" in job and job["status"].get("fixed"):
            return job
        state = self.states[min(self.polls, len(self.states) - 1)]
        self.polls += 1
        conds = {"succeeded": [{"type": "Complete", "status": "True"}],
                 "failed": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                             "message": "jobset failed"}]}.get(state, [])
        if state in ("succeeded", "failed") and self.on_done is not None:
            self.on_done(job)
            self.on_done = None
        return {**job, "status": {"conditions": conds}}

    def delete_namespaced_custom_object(self, group, version, ns, plural, name):
        self.calls.append(("delete", name))
        self.jobs.pop(name, None)

    # CoreV1Api
    def list_namespaced_pod(self, ns, label_selector):
        assert label_selector.startswith(trainjob.JOBSET_LABEL + "=")
        from types import SimpleNamespace

        return SimpleNamespace(items=[_pod("job-node-0-1", 1, self.exit_codes[1]),
                                      _pod("job-node-0-0", 0, self.exit_codes[0])])

    def read_namespaced_pod_log(self, name, ns, container):
        assert container == "node"
        text = self.logs.get(name, "")
        if name.endswith("-0"):  # rank 0: one more line per poll while running
            lines = text.splitlines()
            return "\n".join(lines[:self.polls] if self.polls < len(self.states) else lines)
        return text


def _settings(mount):
    return k8s_settings.load().model_copy(update={"mount_path": str(mount)})


def _completed(folder):
    """A completed stage folder (what ``launch`` accepts as an input)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".coaflow-stage").write_text(folder.name)
    (folder / "result.json").write_text("{}")
    (folder / ".complete").write_text("key")
    return folder


def _inputs_of(job) -> dict:
    """The TrainJob's ``--input`` folders, each with whether it is a completed stage folder."""
    from pathlib import Path

    argv, found = job["spec"]["trainer"]["command"], {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--input":
            key, folder = value.split("=", 1)
            found.setdefault(key, []).append((folder, (Path(folder) / ".complete").exists()))
    return found


def _stage_folder(job):
    """What the nodes do: write a completed stage folder on the volume."""
    from pathlib import Path

    argv = job["spec"]["trainer"]["command"]
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / ".coaflow-stage").write_text(argv[argv.index("stage") + 1])
    (out / "result.json").write_text('{"outputs": {"model": "./model"}}')
    (out / ".complete").write_text("key")


def test_a_launched_stage_is_submitted_waited_for_and_its_folder_comes_back(tmp_path):
    """The KFP case: input and output artifacts live in the launcher pod, not on the volume."""
    mount, pod = tmp_path / "pvc", tmp_path / "pod"
    _completed(pod / "gate")
    lines = "step 1 loss 2.0\nstep 2 loss 1.5\nstep 3 loss 1.2\ndone"
    fake = FakeCluster(["running", "running", "running", "succeeded"],
                       logs={"job-node-0-0": lines, "job-node-0-1": "rank 1 ok"},
                       on_done=lambda job: (seen.append(_inputs_of(job)), _stage_folder(job)))
    said, seen = [], []
    code = trainjob.launch("sft", profile="p", out=str(pod / "sft-out"),
                           inputs={"gate": str(pod / "gate")}, overrides=["sft.nodes=2"],
                           run_id="r1", ks=_settings(mount), nodes=2, gpus_per_node=8,
                           apis=(fake, fake), log=said.append, sleep=lambda s: None)
    assert code == 0
    name = trainjob.job_name("r1", "sft", str(pod / "sft-out"))
    assert ("create", name) in fake.calls and ("delete", name) in fake.calls
    assert not fake.jobs  # deleted once it succeeded
    assert [c for c in said if c.startswith("submitted")] == [f"submitted TrainJob coaflow/{name}"]
    # the nodes read the input from the volume (a copy, removed once the job ended) and wrote
    # the stage folder there
    staged = mount / "runs" / "r1" / ".launch" / name / "inputs" / "gate"
    assert seen == [{"gate": [(str(staged), True)]}] and not staged.exists()
    assert (mount / "runs" / "r1" / ".launch" / name / "sft").is_dir()
    assert (pod / "sft-out" / "result.json").exists() and (pod / "sft-out" / ".complete").exists()
    # rank 0's log surfaced once, line by line, in order; the other node's at the end
    logged = [s.split("] ", 1)[1] for s in said if s.startswith("[job-node-0-0]")]
    assert logged == lines.splitlines()
    assert "[job-node-0-1] rank 1 ok" in said
    assert f"TrainJob coaflow/{name}: running" in said
    assert f"TrainJob coaflow/{name}: succeeded" in said


def _name(tmp_path):
    return trainjob.job_name("r1", "sft", str(tmp_path / "pvc" / "runs" / "r1" / "sft"))


def _launch(fake, tmp_path, said=None):
    mount = tmp_path / "pvc"
    out = mount / "runs" / "r1" / "sft"
    _completed(mount / "g")
    return trainjob.launch("sft", profile="p", out=str(out), inputs={"gate": str(mount / "g")},
                           overrides=[], run_id="r1", ks=_settings(mount), nodes=2,
                           gpus_per_node=1, apis=(fake, fake),
                           log=(said if said is not None else []).append, sleep=lambda s: None)


TORCHRUN_FAILURE = """Traceback ...
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
coaflow.launch FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-01-01_00:00:00
  host      : job-node-0-0
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 41)
  error_file: <N/A>
"""


def test_a_failed_job_exits_with_the_failed_ranks_own_code_and_shows_every_nodes_log(tmp_path):
    said = []
    fake = FakeCluster(["running", "failed"], logs={"job-node-0-0": "config error\n" +
                                                     TORCHRUN_FAILURE,
                                                     "job-node-0-1": "rank 1 was stopped"},
                       exit_codes=(1, 1))
    assert _launch(fake, tmp_path, said) == 2  # bad config: Airflow and KFP do not retry it
    assert "[job-node-0-1] rank 1 was stopped" in said
    assert any("config error" in s for s in said)
    assert any("failed (FailedJobs: jobset failed): the stage exits 2" in s for s in said)
    assert ("delete", _name(tmp_path)) not in fake.calls  # kept for kubectl describe
    assert not (tmp_path / "pvc" / ".launch").exists()  # inputs on the volume: not copied


def test_without_torchruns_summary_the_node_containers_code_counts_else_1(tmp_path):
    assert _launch(FakeCluster(["failed"], exit_codes=(None, 137)), tmp_path) == 137
    assert _launch(FakeCluster(["failed"]), tmp_path) == 1
    signal = TORCHRUN_FAILURE.replace("exitcode  : 2", "exitcode  : -9")
    from coaflow.orchestrate.airflow import outcome

    code = _launch(FakeCluster(["failed"], logs={"job-node-0-0": signal}), tmp_path)
    assert code == 75 and outcome(code) == "retry"  # a lost process: worth a retry (before:
    # -9, which the launcher's process exit turned into 247)


def test_a_retried_task_attaches_to_its_running_job_and_replaces_a_finished_one(tmp_path):
    name = _name(tmp_path)
    job = {"metadata": {"name": name, "namespace": "coaflow"}}
    done = lambda job: _completed(tmp_path / "pvc" / "runs" / "r1" / "sft")  # noqa: E731
    running = FakeCluster(["running", "succeeded"], existing=dict(job), on_done=done)
    assert _launch(running, tmp_path) == 0
    assert [c for c in running.calls if c[0] == "create"] == [("create", name)]
    assert running.calls.count(("delete", name)) == 1  # only after it succeeded

    failed = {**job, "status": {"fixed": True, "conditions": [{"type": "Failed",
                                                                 "status": "True"}]}}
    again = FakeCluster(["running", "succeeded"], existing=failed, on_done=done)
    said = []
    assert _launch(again, tmp_path, said) == 0
    assert again.calls[:3] == [("create", name), ("delete", name), ("create", name)]
    assert any("exists and failed: deleting it" in s for s in said)


def test_the_launcher_command_of_an_airflow_pod(tmp_path, monkeypatch):
    """``python -m coaflow.orchestrate.trainjob ... -- coaflow stage ...``: the Airflow form."""
    mount = tmp_path / "pvc"
    fake = FakeCluster(["succeeded"], on_done=_stage_folder)
    monkeypatch.setattr(trainjob, "clients", lambda: (fake, fake))
    _completed(mount / "r" / "sft")
    _completed(mount / "r" / "gate")
    ks = _settings(mount)
    argv = ["--nodes", "2", "--gpus-per-node", "4", "--k8s-json", ks.model_dump_json(), "--",
            "coaflow", "stage", "rl", "--config", "default", "--out", str(mount / "r" / "rl"),
            "--run-id", "r7", "--set", "rl.nodes=2", "--input", f"sft={mount / 'r' / 'sft'}",
            "--input", f"gate={mount / 'r' / 'gate'}"]
    seen = {}
    create = fake.create_namespaced_custom_object
    fake.create_namespaced_custom_object = lambda *a: (seen.setdefault("job", a[-1]), create(*a))
    assert trainjob.main(argv) == 0
    trainer = seen["job"]["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["command"][:5] == ["torchrun", "-m", "coaflow.launch", "stage", "rl"]
    # every folder is already on the volume: the same paths, nothing copied
    assert trainer["command"][5:] == ["--config", "default", "--out", str(mount / "r" / "rl"),
                                      "--run-id", "r7", "--set", "rl.nodes=2",
                                      "--input", f"gate={mount / 'r' / 'gate'}",
                                      "--input", f"sft={mount / 'r' / 'sft'}"]
    assert not (mount / "runs").exists()
    assert ("delete", trainjob.job_name("r7", "rl", str(mount / "r" / "rl"))) in fake.calls


def test_placement_is_a_trainjob_only_past_one_gpu_process():
    from coaflow.config import load_config

    assert trainjob.placement(load_config("default"), "sft") is None
    assert trainjob.placement(load_config("default", ["sft.nodes=2", "sft.gpus_per_node=8"]),
                              "sft") == (2, 8)
    assert trainjob.placement(load_config("default", ["rl.gpus_per_node=4"]), "rl") == (1, 4)
    assert trainjob.placement(load_config("default"), "evaluate") is None


def test_job_names_are_dns_labels_short_enough_for_jobset():
    long = trainjob.job_name("manual__2026-11-30T20-40-00.123456-00-00", "sft", "/o/sft")
    assert len(long) <= 40 and re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", long), long
    short = trainjob.job_name("R1", "rl", "/o/rl")
    assert short.startswith("coaflow-r1-") and short.endswith("-rl")
    assert trainjob.job_name("R1", "rl", "/other/rl") != short  # a reused run name: its own job


# --- issue 32 (8): every outcome of the launch step is one line and its exit code -----------------

def _launch_from_pod(fake, tmp_path, capsys, out=None):
    """The KFP case (input and output in the launcher pod): ``(code, stderr lines, said)``."""
    mount, pod = tmp_path / "pvc", tmp_path / "pod"
    if not (pod / "gate").exists():
        _completed(pod / "gate")
    said: list[str] = []
    code = trainjob.launch("sft", profile="p", out=str(out or pod / "sft-out"),
                           inputs={"gate": str(pod / "gate")}, overrides=[], run_id="r1",
                           ks=_settings(mount), nodes=2, gpus_per_node=1, apis=(fake, fake),
                           log=said.append, sleep=lambda s: None)
    return code, [line for line in capsys.readouterr().err.splitlines() if line], said


class Vanishing(FakeCluster):
    """The TrainJob is deleted (by someone else) after ``after`` polls."""

    def __init__(self, *a, after=2, **kw):
        super().__init__(*a, **kw)
        self.after = after

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if self.polls >= self.after:
            self.jobs.pop(name, None)
        return super().get_namespaced_custom_object(group, version, ns, plural, name)


class Undeletable(FakeCluster):
    """Deleting the TrainJob is accepted, but it never goes away (a stuck finalizer)."""

    def delete_namespaced_custom_object(self, group, version, ns, plural, name):
        self.calls.append(("delete", name))


def test_a_trainjob_deleted_while_waited_on_is_a_retry(tmp_path, capsys):
    code, err, _ = _launch_from_pod(Vanishing(["running"] * 5), tmp_path, capsys)
    assert code == 75 and len(err) == 1 and "was deleted while it ran" in err[0], err
    assert not list((tmp_path / "pvc").rglob("inputs/gate"))  # its copy of the input is gone


def test_a_complete_trainjob_without_its_stage_folder_is_one_line(tmp_path, capsys):
    code, err, _ = _launch_from_pod(FakeCluster(["running", "succeeded"]), tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "left no completed stage folder" in err[0], err
    assert not (tmp_path / "pod" / "sft-out").exists()


def test_a_rank_killed_by_sigkill_exits_75_not_247(tmp_path, capsys, monkeypatch):
    signal = TORCHRUN_FAILURE.replace("exitcode  : 2", "exitcode  : -9")
    fake = FakeCluster(["failed"], logs={"job-node-0-0": signal})
    monkeypatch.setattr(trainjob, "clients", lambda: (fake, fake))
    mount = tmp_path / "pvc"
    _completed(mount / "r" / "gate")
    argv = ["--nodes", "2", "--gpus-per-node", "1", "--k8s-json",
            _settings(mount).model_dump_json(), "--poll-s", "0", "--", "coaflow", "stage", "sft",
            "--out", str(mount / "r" / "sft"), "--input", f"gate={mount / 'r' / 'gate'}"]
    assert trainjob.main(argv) == 75


def test_a_finished_trainjob_that_never_goes_away_is_a_retry_at_once(tmp_path, capsys):
    import time

    name = trainjob.job_name("r1", "sft", str(tmp_path / "pod" / "sft-out"))
    failed = {"metadata": {"name": name, "namespace": "coaflow"},
              "status": {"fixed": True, "conditions": [{"type": "Failed", "status": "True"}]}}
    start = time.monotonic()
    code, err, _ = _launch_from_pod(Undeletable(["running"], existing=failed), tmp_path, capsys)
    assert time.monotonic() - start < 10  # before: 300 s of polling, then a raw 409
    assert code == 75 and len(err) == 1 and "still there after 300 s" in err[0], err


def test_the_output_folder_is_replaced_never_merged(tmp_path, capsys):
    out = _completed(tmp_path / "pod" / "sft")  # an earlier attempt of this stage's folder
    (out / "stale_model.bin").write_text("old")
    code, err, _ = _launch_from_pod(FakeCluster(["succeeded"], on_done=_stage_folder), tmp_path,
                                    capsys, out=out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".coaflow-stage", ".complete", "result.json"]


def test_an_output_folder_with_foreign_files_is_refused_before_anything(tmp_path, capsys):
    out = tmp_path / "pod" / "mine"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("x")
    fake = FakeCluster(["succeeded"], on_done=_stage_folder)
    code, err, _ = _launch_from_pod(fake, tmp_path, capsys, out=out)
    assert code == 2 and len(err) == 1 and "refusing" in err[0], err
    assert fake.calls == [] and not (tmp_path / "pvc").exists()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
