"""The Kubeflow pipeline: one component per coaflow stage, wired from ``coaflow.pipeline``.

    python -m components.coaflow_pipeline            # recompile components/coaflow_pipeline.yaml
    coaflow run --engine kfp                         # run it here with kfp.local (no cluster)

Every stage in ``STAGES`` (in ``ORDER``) becomes a component of the same name whose body runs
``coaflow stage NAME --config PROFILE --out <result> --input S=<upstream result> ...``
(``coaflow.kfp_engine.run_component``). The components are lightweight Python components because
``kfp.local.SubprocessRunner`` runs nothing else; on a cluster they run in the coaflow images,
which hold coaflow and kfp, so nothing is pip-installed at run time. Inputs and outputs are
artifacts: ``result`` is the stage folder (``result.json`` + marker), ``metrics`` its metrics.
A stage's upstream artifacts are its ``NEEDS`` (required) and ``OPTIONAL`` (wired when that
stage is in the pipeline), so a stage that lands on main appears here after a recompile.

On Kubernetes (``kfp-kubernetes``): GPU stages (sft, rl, evaluate) ask for ``nvidia.com/gpu``,
select GPU nodes and tolerate their taint; every task mounts the ``coaflow-work`` PVC (workdir,
model and dataset caches), reads optional secrets as env (API keys, S3 credentials) and records
the KFP run name as ``COAFLOW_RUN_ID`` for MLflow. Caching follows the stage's ``CACHE`` flag
(deploy always runs); stages after ``register`` run only when it did not refuse the promotion.
"""

# No ``from __future__ import annotations`` here: KFP reads the pipeline's annotations as types.
import argparse
import contextlib
import linecache
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from coaflow import __version__
from coaflow.pipeline import STAGES, load_stage

REGISTRY = "ghcr.io/coaflow"
CPU_IMAGE = f"{REGISTRY}/coaflow-cpu:{__version__}"
GPU_IMAGE = f"{REGISTRY}/coaflow-gpu:{__version__}"
PROMOTION = "register"  # returns "refused" when the candidate lost: later stages are skipped

# stage: (cpu request, memory request, GPUs). Unknown stages get the default.
RESOURCES = {
    "synthesize": ("4", "8Gi", 0),
    "gate": ("2", "8Gi", 0),
    "sft": ("8", "64Gi", 1),
    "rl": ("8", "64Gi", 1),
    "evaluate": ("4", "32Gi", 1),
    "register": ("1", "2Gi", 0),
    "deploy": ("1", "1Gi", 0),
}
DEFAULT_RESOURCES = ("1", "2Gi", 0)
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")  # set by the NVIDIA GPU operator
# The PVC and mount the Airflow DAG uses too (run.workdir); helm/coaflow-pipeline creates it.
CACHE_PVC, CACHE_MOUNT = "coaflow-work", "/data/coaflow"
UID = 1000  # the images' user; the chart's init job makes the cache PVC group-writable for it
SECRET = "coaflow-secrets"  # helm/coaflow-pipeline (or you) creates it; optional: a key that is missing leaves its variable unset
SECRET_ENV = {
    "openai-api-key": "OPENAI_API_KEY",  # the LLM teacher / evaluation endpoints
    "hf-token": "HF_TOKEN",  # gated hub models
    "aws-access-key-id": "AWS_ACCESS_KEY_ID",  # MLflow's S3 artifact store
    "aws-secret-access-key": "AWS_SECRET_ACCESS_KEY",
    "mlflow-tracking-token": "MLFLOW_TRACKING_TOKEN",
}
RUN_NAME_FIELD = "metadata.annotations['pipelines.kubeflow.org/run_name']"

# The body of a stage component. KFP ships a function's source to the pod, so each stage gets
# its own small function with its own artifact inputs (its NEEDS, then its OPTIONAL).
_SOURCE = '''\
def {name}(profile: str, overrides: list, seed: int, workdir: str, tracking_uri: str,
{pad}retries: int, result: Output[Artifact], metrics: Output[Metrics]{inputs}) -> str:
    """Run coaflow stage {name!r} from its upstream stage folders into ``result``."""
    from coaflow.kfp_engine import run_component

    return run_component({name!r}, profile=profile, overrides=overrides, seed=seed,
                         workdir=workdir, tracking_uri=tracking_uri, retries=retries,
                         out=result.path, metrics=metrics, inputs={{{mapping}}})
'''


def stage_inputs(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) upstream stages of ``name`` that are in the pipeline."""
    module = load_stage(name)
    needs = tuple(getattr(module, "NEEDS", ()))
    optional = tuple(s for s in getattr(module, "OPTIONAL", ()) if s in STAGES and s not in needs)
    return needs, optional


def stage_component(name: str, image: str):
    """The lightweight Python component of stage ``name``."""
    needs, optional = stage_inputs(name)
    inputs = "".join(f", {s}: Input[Artifact]" for s in needs)
    inputs += "".join(f", {s}: Input[Artifact] = None" for s in optional)
    mapping = ", ".join(f"{s!r}: {s}" for s in needs + optional)
    source = _SOURCE.format(name=name, pad=" " * (len(name) + 5), inputs=inputs, mapping=mapping)
    filename = f"<coaflow component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {"Input": dsl.Input, "Output": dsl.Output, "Artifact": dsl.Artifact,
             "Metrics": dsl.Metrics, "__name__": __name__}
    exec(compile(source, filename, "exec", dont_inherit=True), scope)  # our own template
    return dsl.component(scope[name], base_image=image, install_kfp_package=False)


COMPONENTS = {n: stage_component(n, GPU_IMAGE if RESOURCES.get(n, DEFAULT_RESOURCES)[2]
                                 else CPU_IMAGE) for n in STAGES}


def _configure(task, name: str) -> None:
    """Resources, caching and the Kubernetes settings of one stage task."""
    cpu, memory, gpus = RESOURCES.get(name, DEFAULT_RESOURCES)
    task.set_caching_options(getattr(load_stage(name), "CACHE", True))
    task.set_cpu_request(cpu).set_memory_request(memory)
    if gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        kubernetes.add_node_selector(task, *GPU_NODE_LABEL)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    kubernetes.set_security_context(task, run_as_user=UID, run_as_group=UID, run_as_non_root=True)
    kubernetes.mount_pvc(task, pvc_name=CACHE_PVC, mount_path=CACHE_MOUNT)
    kubernetes.use_secret_as_env(task, SECRET, SECRET_ENV, optional=True)
    kubernetes.use_field_path_as_env(task, "COAFLOW_RUN_ID", RUN_NAME_FIELD)


@dsl.pipeline(name="coaflow", description="Chain-of-Agents training: " + " -> ".join(STAGES))
def coaflow_pipeline(profile: str = "tiny", overrides: list = [],  # noqa: B006 - a KFP default
                     seed: int = 0, workdir: str = CACHE_MOUNT,
                     tracking_uri: str = "http://coaflow-tracking.coaflow:5000",
                     retries: int = 3):
    """``profile``: a profile name or a config file in the image; ``overrides``: SECTION.KEY=VALUE
    items as ``--set`` takes them; ``retries``: attempts after an exit 75 (service unavailable)."""
    params = dict(profile=profile, overrides=overrides, seed=seed, workdir=workdir,
                  tracking_uri=tracking_uri, retries=retries)
    tasks = {}
    with contextlib.ExitStack() as after_promotion:
        for name in STAGES:
            needs, optional = stage_inputs(name)
            inputs = {s: tasks[s].outputs["result"] for s in needs + optional if s in tasks}
            tasks[name] = COMPONENTS[name](**params, **inputs)
            _configure(tasks[name], name)
            if name == PROMOTION:
                after_promotion.enter_context(
                    dsl.If(tasks[name].outputs["Output"] != "refused", name="promoted"))


def compile_pipeline(path: str | Path) -> Path:
    compiler.Compiler().compile(coaflow_pipeline, str(path))
    return Path(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="compile the coaflow Kubeflow pipeline")
    parser.add_argument("--output", default=str(Path(__file__).with_suffix(".yaml")))
    print(compile_pipeline(parser.parse_args().output))
