"""The compiled pipeline: committed YAML up to date, every stage a task with its image,
resources, dependencies and Kubernetes settings; the full stage list wires the promotion gate."""

from pathlib import Path

import yaml

from coaflow import contract
from coaflow.orchestrate import k8s
from coaflow.orchestrate.kfp import compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "components" / "coaflow_pipeline.yaml"


def _docs(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    """Every task, the ones inside conditions too: name -> (task spec, condition or None)."""
    found, comps = {}, spec["components"]

    def walk(dag: dict, condition: str | None) -> None:
        for name, task in dag["tasks"].items():
            ref = task["componentRef"]["name"]
            if "dag" in comps.get(ref, {}):
                walk(comps[ref]["dag"], task.get("triggerPolicy", {}).get("condition"))
            else:
                found[name] = (task, condition)

    walk(spec["root"]["dag"], None)
    return found


def _producer(artifact: dict) -> str:
    """The task an input artifact comes from; inside a condition the sub-DAG receives it as a
    component input named ``pipelinechannel--<task>-result``."""
    if "taskOutputArtifact" in artifact:
        return artifact["taskOutputArtifact"]["producerTask"]
    return artifact["componentInputArtifact"].removeprefix("pipelinechannel--").rsplit("-", 1)[0]


def test_committed_yaml_is_what_the_pipeline_compiles_to(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml", k8s.load()).read_text()
    assert fresh == COMPILED.read_text(), (
        "components/coaflow_pipeline.yaml is stale: run python -m components.coaflow_pipeline")


def test_every_stage_is_a_task_with_its_image_resources_inputs_and_k8s_settings():
    spec, platform = _docs(COMPILED)
    tasks = _tasks(spec)
    assert sorted(tasks) == sorted(contract.ORDER)  # stage names = task names
    executors = spec["deploymentSpec"]["executors"]
    ks = k8s.load()
    ((secret, _),) = ks.secret_env().items()
    for name, (task, _) in tasks.items():
        module = contract.load_stage(name)
        container = executors[f"exec-{name}"]["container"]
        res = ks.for_stage(name)
        cpu, memory, gpus = res.cpu, res.memory, res.gpus
        assert container["image"] == (ks.images.gpu if gpus else ks.images.cpu)
        assert container["resources"]["resourceCpuRequest"] == cpu
        assert container["resources"]["resourceCpuLimit"] == cpu
        assert container["resources"]["resourceMemoryRequest"] == memory
        assert container["resources"]["resourceMemoryLimit"] == memory
        assert "pip install" not in " ".join(container["command"])  # the image holds coaflow
        assert "run_component(stage" in container["command"][-1]
        assert task["inputs"]["parameters"]["stage"]["runtimeValue"]["constant"] == name
        upstream = {k: _producer(v) for k, v in task.get("inputs", {}).get("artifacts", {}).items()}
        assert set(module.NEEDS) <= set(upstream) and all(k == v for k, v in upstream.items())
        assert task["cachingOptions"].get("enableCache", False) == getattr(module, "CACHE", True)
        ex = platform[f"exec-{name}"]
        assert ex["pvcMount"][0]["mountPath"] == ks.mount_path
        assert ex["secretAsEnv"][0]["secretName"] == secret and ex["secretAsEnv"][0]["optional"]
        assert ex["fieldPathAsEnv"][0]["name"] == "COAFLOW_RUN_ID"
        assert ex["configMapAsEnv"][0]["configMapName"] == ks.mlflow_configmap
        if gpus:
            assert container["resources"]["accelerator"]["resourceCount"] == str(gpus)
            assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert ex["nodeSelector"]["labels"] == ks.gpu_node_selector
            assert ex["tolerations"][0]["key"] == "nvidia.com/gpu"
            assert ex["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        else:
            assert "accelerator" not in container["resources"]
            assert "nodeSelector" not in ex and "tolerations" not in ex
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"profile", "overrides", "seed", "workdir", "tracking_uri", "run_id",
            "retries"} <= set(params)


def compile_full_pipeline(monkeypatch, path: Path) -> Path:
    """The pipeline of every stage of ORDER, compiled."""
    return compile_pipeline(path, k8s.load())


def test_all_stages_wire_optional_inputs_and_deploy_only_after_a_promotion(monkeypatch, tmp_path):
    spec, platform = _docs(compile_full_pipeline(monkeypatch, tmp_path / "full.yaml"))
    tasks = _tasks(spec)
    assert sorted(tasks) == sorted(contract.ORDER)
    inputs = {n: set(t.get("inputs", {}).get("artifacts", {})) for n, (t, _) in tasks.items()}
    assert inputs["evaluate"] == {"sft", "rl"}  # the budget comes with sft (budget.json)
    assert inputs["register"] == {"evaluate", "sft", "rl", "gate"}
    conditions = {n: c for n, (_, c) in tasks.items() if c}
    assert list(conditions) == ["deploy"]
    assert "register" in conditions["deploy"] and "refused" in conditions["deploy"]
    assert not tasks["deploy"][0]["cachingOptions"].get("enableCache", False)
    gpu = {n for n in tasks if "nodeSelector" in platform[f"exec-{n}"]}
    assert gpu == {"sft", "rl", "evaluate"}


SHAPED = ["synthesize.shards=3", "sft.nodes=2", "sft.gpus_per_node=8"]


def test_a_profile_with_shards_and_a_multi_node_sft_fans_out_and_launches(tmp_path):
    """Compiled for synthesize.shards=3 and sft on 2 x 8 GPUs: synthesize runs in a ParallelFor
    over the shard indexes, the gate collects every shard's folder, and the sft task is the
    launcher (CPU image, no GPU, the PVC) that submits the TrainJob of the stage."""
    ks = k8s.load()
    spec, platform = _docs(compile_pipeline(tmp_path / "shaped.yaml", ks, "default", SHAPED))
    comps, root = spec["components"], spec["root"]
    by_name = {t["taskInfo"]["name"]: (key, t) for key, t in root["dag"]["tasks"].items()}
    loop_key, loop = by_name["synthesize-shards"]
    assert loop["parameterIterator"]["items"]["raw"] == "[0, 1, 2]"
    inner = comps[loop["componentRef"]["name"]]["dag"]["tasks"]["synthesize"]
    params = inner["inputs"]["parameters"]
    assert params["shard"]["componentInputParameter"].startswith("pipelinechannel--loop-item")
    assert params["shape"]["runtimeValue"]["constant"] == {
        "shards": 3, "launched": {"sft": [2, 8]}}
    gate = root["dag"]["tasks"]["gate"]
    fan_in = gate["inputs"]["artifacts"]["synthesize_shards"]["taskOutputArtifact"]
    assert fan_in == {"outputArtifactKey": "pipelinechannel--synthesize-result",
                      "producerTask": loop_key}
    assert "sft" not in by_name  # the stage's task is its launcher, named so in the UI
    sft = root["dag"]["tasks"]["launch-sft"]
    assert sft["componentRef"]["name"] == "comp-launch-sft"
    assert root["dag"]["tasks"]["rl"]["inputs"]["artifacts"]["sft"]["taskOutputArtifact"][
        "producerTask"] == "launch-sft"  # the stage folder it copied back is the sft result
    launch = sft["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]
    assert (launch["nodes"], launch["gpus_per_node"]) == (2, 8)
    # what the TrainJob's nodes get (the run's config they get as argv)
    assert launch["settings"] == ks.model_dump(mode="json", exclude={"profile", "overrides"})
    container = spec["deploymentSpec"]["executors"]["exec-launch-sft"]["container"]
    assert container["image"] == ks.images.cpu and "accelerator" not in container["resources"]
    assert container["resources"]["resourceMemoryLimit"] == ks.launcher.memory
    ex = platform["exec-launch-sft"]
    assert ex["pvcMount"][0]["mountPath"] == ks.mount_path and "nodeSelector" not in ex
    # the TrainJob goes to the launcher's own namespace (a Kubeflow profile's), not the one
    # compiled into the settings
    assert {"name": "COAFLOW_NAMESPACE", "fieldPath": "metadata.namespace"} in ex["fieldPathAsEnv"]
    # rl stays one GPU pod; the runs' defaults are the profile and overrides compiled for
    assert spec["deploymentSpec"]["executors"]["exec-rl"]["container"]["image"] == ks.images.gpu
    defaults = root["inputDefinitions"]["parameters"]
    assert defaults["overrides"]["defaultValue"] == SHAPED
    assert defaults["profile"]["defaultValue"] == "default"


def test_the_default_profile_compiles_to_one_task_per_stage():
    """shards=1 and one GPU per training stage: no loop, no launcher (the committed YAML)."""
    spec, _ = _docs(COMPILED)
    assert "synthesize" in spec["root"]["dag"]["tasks"]
    assert not [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert not [c for c in spec["components"] if "launch-" in c]
    first = spec["root"]["dag"]["tasks"]["synthesize"]["inputs"]["parameters"]["shape"]
    assert first["runtimeValue"]["constant"] == {"shards": 1, "launched": {}}
