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

On Kubernetes (``kfp-kubernetes``) every setting comes from the Kubernetes settings file the
Airflow DAG's pods read too (``coaflow.k8s_settings``): GPU stages (sft, rl, evaluate) run the GPU
image, ask for ``nvidia.com/gpu``, select GPU nodes, tolerate their taint and get a RAM-backed
/dev/shm; every task has CPU/memory requests = limits, mounts the ``coaflow-work`` PVC (workdir,
model and dataset caches), reads optional secrets as env (API keys, S3 credentials) and the
MLflow URI from the ``coaflow-mlflow`` ConfigMap, and records the KFP run name as
``COAFLOW_RUN_ID`` for MLflow. Caching follows the stage's ``CACHE`` flag
(deploy always runs); stages after ``register`` run only when it did not refuse the promotion.
"""

# No ``from __future__ import annotations`` here: KFP reads the pipeline's annotations as types.
import argparse
import contextlib
import linecache
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from coaflow import k8s_settings
from coaflow.pipeline import STAGES, load_stage

# Images, resources, GPUs, /dev/shm, the PVC, secrets, the MLflow ConfigMap and the user come from
# the one Kubernetes settings file the Airflow DAG's pods read too (coaflow's k8s.yaml, or
# $COAFLOW_K8S_CONFIG at compile time).
K8S = k8s_settings.load()
PROMOTION = "register"  # returns "refused" when the candidate lost: later stages are skipped
CPU_IMAGE, GPU_IMAGE = K8S.images.cpu, K8S.images.gpu
GPU_RESOURCE = k8s_settings.GPU_RESOURCE
CACHE_PVC, CACHE_MOUNT = K8S.pvc, K8S.mount_path
UID = K8S.uid  # the images' user; the chart's init job makes the cache PVC group-writable for it
SECRET_ENVS = K8S.secret_env()  # Secret -> {key: variable}; optional: a missing key stays unset
SECRET = next(iter(SECRET_ENVS), "")
SECRET_ENV = SECRET_ENVS.get(SECRET, {})
MLFLOW_ENV = "MLFLOW_TRACKING_URI"  # the key of the MLflow ConfigMap every stage reads
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


COMPONENTS = {n: stage_component(n, K8S.image_for(n)) for n in STAGES}


def _configure(task, name: str) -> None:
    """Resources (requests = limits), caching and the Kubernetes settings of one stage task,
    as the Airflow DAG gives the same stage's pod."""
    res = K8S.for_stage(name)
    task.set_caching_options(getattr(load_stage(name), "CACHE", True))
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(res.gpus)
        for label, value in K8S.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label, value)
        for toleration in K8S.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration)
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory", size_limit=K8S.shm_size)
    kubernetes.set_security_context(task, run_as_user=UID, run_as_group=UID, run_as_non_root=True)
    kubernetes.mount_pvc(task, pvc_name=CACHE_PVC, mount_path=CACHE_MOUNT)
    for secret, key_to_env in SECRET_ENVS.items():
        kubernetes.use_secret_as_env(task, secret, key_to_env, optional=True)
    if K8S.mlflow_configmap:
        kubernetes.use_config_map_as_env(task, K8S.mlflow_configmap, {MLFLOW_ENV: MLFLOW_ENV})
    kubernetes.use_field_path_as_env(task, "COAFLOW_RUN_ID", RUN_NAME_FIELD)


@dsl.pipeline(name="coaflow", description="Chain-of-Agents training: " + " -> ".join(STAGES))
def coaflow_pipeline(profile: str = "default", overrides: list = [],  # noqa: B006 - a KFP default
                     seed: int = 0, workdir: str = CACHE_MOUNT,
                     tracking_uri: str = "",
                     retries: int = 3):
    """``profile``: a profile name or a config file in the image; ``overrides``: SECTION.KEY=VALUE
    items as ``--set`` takes them; ``tracking_uri``: empty: the MLflow ConfigMap's (as Airflow's
    pods); ``retries``: attempts after an exit 75 (service unavailable)."""
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
