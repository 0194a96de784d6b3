"""The DAG as the Airflow image runs it: coaflow installed from a built wheel (not the source
tree), the DAG folder a copy of dags/ elsewhere. Its settings file and the packaged Kubernetes
settings are found, so a GPU stage gets its GPU and the schedule is the file's; without the
settings file the DAG does not import, and the import error names the missing path."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.dags.conftest import DAGS, ROOT, airflow_env, python

LOAD = r"""
import json, os
import coaflow
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
dag = bag.dags.get("coaflow_retrain")
out = {"coaflow": coaflow.__file__, "errors": {k: str(v) for k, v in bag.import_errors.items()}}
if dag is not None:
    from coaflow.orchestrate import airflow as af
    from coaflow.orchestrate import airflow_pods as ap
    from coaflow.orchestrate.k8s import PACKAGED
    settings = af.load_settings(default=os.path.join(os.environ["AIRFLOW__CORE__DAGS_FOLDER"],
                                                     "coaflow_retrain.yaml"))
    from kubernetes.client import ApiClient
    pod = ApiClient().sanitize_for_serialization(ap.pod_spec("sft", settings, ["true"]))
    out.update(schedule=str(dag.schedule), mode=settings.mode, k8s=str(PACKAGED),
               sft=pod["spec"]["containers"][0]["resources"]["limits"],
               tolerations=pod["spec"].get("tolerations"),
               secrets=[e["name"] for e in pod["spec"]["containers"][0]["env"] if "valueFrom" in e])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """coaflow built into a wheel and installed into a folder of its own; the DAG folder copied."""
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"  # what the image's build context holds; builds leave no build/ here
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "dist"), str(project)],
                   check=True, capture_output=True, timeout=300, cwd=tmp)
    wheel = next((tmp / "dist").glob("coaflow-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    dags = tmp / "airflow-dags"  # as the image's COPY dags/ /opt/airflow/dags/
    shutil.copytree(DAGS, dags, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp, dags


def _env(tmp, dags):
    env = airflow_env(tmp / "home", tmp / "work", AIRFLOW__CORE__DAGS_FOLDER=str(dags),
                      PYTHONPATH=str(tmp / "site"))
    env.pop("COAFLOW_AIRFLOW_SCHEDULE")  # the file's schedule, as in the image
    return env


def test_the_wheel_installed_dag_reads_its_settings_and_the_packaged_pod_settings(installed):
    tmp, dags = installed
    out = python(LOAD, _env(tmp, dags))
    assert out["errors"] == {}, out["_log"]
    assert out["coaflow"].startswith(str(tmp / "site")), out["coaflow"]  # not the source tree
    assert out["k8s"].startswith(str(tmp / "site"))
    assert out["schedule"] == "@weekly"  # the settings file's, not the fallback's
    assert out["sft"]["nvidia.com/gpu"] == "1" and out["sft"]["memory"] == "64Gi"
    assert out["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "OPENAI_API_KEY" in out["secrets"]


def test_without_its_settings_file_the_dag_fails_to_import_naming_the_path(installed, tmp_path):
    tmp, dags = installed
    bare = tmp_path / "dags"
    bare.mkdir()
    shutil.copy(dags / "coaflow_retrain.py", bare)
    out = python(LOAD.replace("if dag is not None:", "if False:"), _env(tmp, bare))
    (error,) = out["errors"].values()
    assert f"{bare / 'coaflow_retrain.yaml'}: the DAG's settings file is missing" in error
