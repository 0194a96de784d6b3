"""The DAG's shape (``orchestrate.shape``): a profile with ``synthesize.shards`` > 1 maps
synthesize over its shards (Airflow dynamic task mapping) and the gate reads every shard's
folder; an sft past one GPU process is a launcher (CPU pod) that submits its TrainJob; a run of
another shape than the DAG was parsed for fails at configure, before any work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coaflow.errors import UserError
from coaflow.orchestrate import airflow as af
from coaflow.orchestrate import airflow_pods as ap
from tests.dags.conftest import ROOT, airflow_env, python
from tests.pods import pod_manifest

SHAPED = "base: smoke\nsynthesize: {shards: 3}\nsft: {nodes: 2, gpus_per_node: 8}\n"

INSPECT = r"""
import json, os
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
dag = bag.dags.get("coaflow_retrain")
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}}
if dag is not None:
    syn, sft = dag.get_task("synthesize"), dag.get_task("sft")
    out.update(
        synthesize={"type": type(syn).__name__, "expand": str(
            (getattr(syn, "op_kwargs_expand_input", None) or syn.expand_input).value)},
        sft={"type": type(sft).__name__, "image": getattr(sft, "image", None),
             "name": getattr(sft, "name", None), "doc": sft.doc_md},
        gate_up=sorted(dag.get_task("gate").upstream_task_ids))
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "shaped.yaml"
    path.write_text(SHAPED)
    return path


@pytest.mark.parametrize("mode", ["local", "kubernetes"])
def test_a_sharded_profile_maps_synthesize_and_launches_sft(tmp_path, profile, mode):
    env = airflow_env(tmp_path / "home", tmp_path / "work", COAFLOW_AIRFLOW_MODE=mode,
                      COAFLOW_AIRFLOW_PROFILE=str(profile))
    info = python(INSPECT, env)
    assert info["errors"] == {}, info["_log"]
    assert "Mapped" in info["synthesize"]["type"]  # dynamic task mapping
    assert "'shard': [0, 1, 2]" in info["synthesize"]["expand"]
    assert info["gate_up"] == ["synthesize"]
    assert "TrainJob" in info["sft"]["doc"]
    if mode == "kubernetes":
        settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes"})
        assert info["sft"]["image"] == settings.kubernetes.images.cpu  # the launcher's
        assert info["sft"]["name"] == "coaflow-launch-sft"


def _plan(profile, **params):
    settings = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes",
                                     "COAFLOW_AIRFLOW_PROFILE": str(profile)})
    return settings, af.plan(params, "manual__1", settings, ["synthesize", "gate", "sft", "rl"])


def test_the_launcher_pod_runs_the_trainjob_launcher_on_the_cpu_image(profile):
    settings, plan = _plan(profile)
    assert plan["shape"] == {"shards": 3, "launched": {"sft": [2, 8]}}
    command = ap.pod_command("sft", plan, {"gate": f"{plan['run_dir']}/gate"},
                             ks=settings.kubernetes)
    manifest = pod_manifest(ap.pod_spec("sft", settings, command, "r1", launcher=True))
    import kubernetes_validate

    kubernetes_validate.validate(manifest, "1.30.0", strict=True)
    c = manifest["spec"]["containers"][0]
    ks = settings.kubernetes
    assert c["image"] == ks.images.cpu and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert c["resources"]["limits"] == {"cpu": ks.launcher.cpu, "memory": ks.launcher.memory}
    assert "nodeSelector" not in manifest["spec"]
    script = c["command"][2]
    assert script.startswith("python -m coaflow.orchestrate.trainjob --nodes 2 --gpus-per-node 8")
    assert f" -- coaflow stage sft --config {profile} --out {plan['run_dir']}/sft" in script
    assert "> /airflow/xcom/return.json" in script  # the XCom names the stage folder, as a pod's
    # rl, evaluate: a plain pod as before
    assert ap.pod_command("rl", plan, {}, ks=ks)[2].startswith("coaflow stage rl")


def test_shard_tasks_write_their_own_folders_and_the_gate_gets_them_all(profile):
    _, plan = _plan(profile)
    argv = af.task_argv("synthesize", plan, {}, shard=2)
    assert argv[argv.index("--out") + 1] == f"{plan['run_dir']}/synthesize-2"
    assert "synthesize.shard=2" in argv
    xcoms = [{"dir": f"{plan['run_dir']}/synthesize-{i}"} for i in range(3)]
    inputs = af.stage_inputs("gate", {"synthesize": xcoms})  # a mapped task's XComs
    gate = af.task_argv("gate", plan, inputs)
    assert [gate[i + 1] for i, a in enumerate(gate) if a == "--input"] == [
        f"synthesize={x['dir']}" for x in xcoms]


def test_a_run_of_another_shape_fails_at_configure(profile):
    with pytest.raises(UserError, match=r"synthesize.shards=1.*built for synthesize.shards=3"):
        _plan(profile, overrides=["synthesize.shards=1"])
    settings = af.load_settings(env={})  # the default profile: one task per stage
    with pytest.raises(UserError, match="COAFLOW_AIRFLOW_PROFILE"):
        af.plan({"overrides": ["sft.nodes=2"]}, "manual__1", settings, ["synthesize", "sft"])


DAG_TEST = r"""
import json, os
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["coaflow_retrain"]
# the stages after the gate are marked done without running (sft would launch a TrainJob);
# partial_subset is no way out: its copy of a mapped @task fails Airflow 3.3's own check
run = dag.test(run_conf={"seed": 3, "overrides": ["tracking.enabled=false"]},
               mark_success_pattern="^(sft|rl|evaluate|register|deploy)$")
print(json.dumps({"state": str(run.state), "run_id": run.run_id,
                  "tasks": sorted((ti.task_id, ti.map_index, str(ti.state))
                                  for ti in run.get_task_instances())}))
"""


@pytest.mark.slow
def test_dag_test_fans_synthesize_out_and_the_gate_merges_the_shards(tmp_path, profile):
    """``dag.test()`` of configure -> synthesize (mapped, 3 shards) -> gate, local mode (the
    later stages marked done): the engine's own fan-out and fan-in, on the smoke profile's 20
    tasks."""
    work = tmp_path / "work"
    env = airflow_env(tmp_path / "airflow", work, COAFLOW_AIRFLOW_PROFILE=str(profile))
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    out = python(DAG_TEST, env, timeout=600)
    assert out["state"] == "success", out["_log"]
    assert [t for t in out["tasks"] if t[0] == "synthesize"] == [
        ["synthesize", i, "success"] for i in range(3)]
    run_dir = work / "runs" / af.safe_run_id(out["run_id"])
    solved = [json.loads((run_dir / f"synthesize-{i}" / "result.json").read_text())
              for i in range(3)]
    assert [s["summary"]["shard"]["index"] for s in solved] == [0, 1, 2]
    report = json.loads((run_dir / "gate" / "gate_report.json").read_text())
    assert report["input"] == [str(run_dir / f"synthesize-{i}" / "trajectories")
                               for i in range(3)]
    assert report["in"] == sum(s["metrics"]["trajectories"] for s in solved)
