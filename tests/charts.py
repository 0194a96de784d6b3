"""The charts under helm/ as the tests render them: Helm's Go SDK (helm-python-sdk, no helm
binary), the umbrella chart helm/coaflow with its three dependencies packaged into charts/ the way
`helm dependency update helm/coaflow` does (in a copy: the checkout stays clean), and what a
`helm upgrade` between two renders would delete or fail to patch."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tests import requires

ROOT = Path(__file__).resolve().parents[1]
UMBRELLA = ROOT / "helm" / "coaflow"
CHARTS = sorted(p.parent for p in (ROOT / "helm").glob("*/Chart.yaml"))
SUBCHARTS = [c for c in CHARTS if c != UMBRELLA]
KUBE_VERSION = "1.33.0"
KEEP = "helm.sh/resource-policy"  # Helm leaves an object so annotated when a release drops it


def helm():
    return requires.module("helm_python")


def build(dst: Path) -> Path:
    """A copy of helm/ under ``dst`` whose umbrella chart has its dependencies in charts/;
    returns the copy's helm/ folder."""
    out = dst / "helm"
    shutil.copytree(ROOT / "helm", out, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    helm().dependency_update(out / UMBRELLA.name)
    return out


def render(chart: Path, values: dict, *, name: str, namespace: str = "coaflow",
           revision: int = 1) -> list[dict]:
    """Every manifest ``helm install`` (revision 1) or ``helm upgrade`` (later) would apply."""
    manifests = helm().Chart.load(chart).render(values, name=name, namespace=namespace,
                                                revision=revision, is_install=revision == 1,
                                                is_upgrade=revision > 1)
    return [doc for path, text in manifests.items() if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text) if doc]


def is_hook(doc: dict) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def key(doc: dict, namespace: str) -> tuple[str, str, str]:
    """(kind, namespace, name): what one object is in the cluster."""
    return doc["kind"], doc["metadata"].get("namespace", namespace), doc["metadata"]["name"]


def upgrade_problems(before: list[dict], after: list[dict], namespace: str = "coaflow"
                     ) -> list[str]:
    """What a `helm upgrade` from ``before`` to ``after`` would break: a Job it deletes (a run
    in progress killed: an object left out of the new manifest goes, unless annotated keep),
    or a Job it must patch with another pod template (immutable: the upgrade fails)."""
    new = {key(d, namespace): d for d in after if not is_hook(d)}
    problems = []
    for doc in before:
        if doc["kind"] != "Job" or is_hook(doc):
            continue
        k = key(doc, namespace)
        keep = (doc["metadata"].get("annotations") or {}).get(KEEP) == "keep"
        if k not in new and not keep:
            problems.append(f"{k}: deleted by the upgrade")
        elif k in new and new[k]["spec"]["template"] != doc["spec"]["template"]:
            problems.append(f"{k}: its pod template changes (immutable)")
    return problems
