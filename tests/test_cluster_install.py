"""docs/cluster.md's install, from an empty cluster to a served model, checked across objects.

The `bash` blocks of the page's walk run in order, by bash, in a copy of the repository, with the
values file (and any other file) its `yaml` blocks name in their first line; `docker`, `helm`,
`kubectl` and `curl` are recorders, so nothing is built or applied. From what they recorded,
every Helm release the walk installs is rendered as Helm would (the umbrella from its packaged
dependencies, each upgrade as the next revision), and together with the pipeline the walk
compiled, the DAG's pods from the settings it derived and a TrainJob from the same settings,
the test checks what no single artifact can: the images are the ones the build pushed, the model
served is the one registered, one namespace holds everything, the work volume can be shared, a
rollout fits one GPU, every Secret key read exists or is documented, no two releases own an
object, and no upgrade kills a run.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests import charts
from tests.charts import ROOT

DOC = ROOT / "docs" / "cluster.md"
WALK = "## From an empty cluster to a served model"
VALUES = "coaflow-values.yaml"
RECORDERS = ("docker", "helm", "kubectl", "curl")
ENV = {"HF_TOKEN": "hf_test", "TEACHER_KEY": "k", "PGPASSWORD": "p", "AWS_ACCESS_KEY_ID": "a",
       "AWS_SECRET_ACCESS_KEY": "s"}


def section(text: str) -> str:
    start = text.index(WALK)
    end = text.find("\n## ", start + len(WALK))
    return text[start:end if end > 0 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order, indentation removed."""
    out = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(3).splitlines())
        out.append((m.group(2), body + "\n"))
    return out


@dataclass
class Walk:
    """What the walk did, as the recorders saw it, and the files it left."""
    cwd: Path
    calls: list[dict]
    python: list[str] = field(default_factory=list)  # its python blocks (not run: a KFP host)
    text: str = ""

    def of(self, cmd: str) -> list[list[str]]:
        return [c["argv"] for c in self.calls if c["cmd"] == cmd]


def run_walk(dst: Path) -> Walk:
    text = DOC.read_text()
    walk_text = section(text)
    cwd = dst / "repo"
    for name in ("helm", "components", "images"):
        shutil.copytree(ROOT / name, cwd / name,
                        ignore=shutil.ignore_patterns("charts", "Chart.lock", "__pycache__"))
    script, python = ["set -euo pipefail"], []
    for lang, body in blocks(walk_text):
        first = body.splitlines()[0]
        if lang == "yaml" and re.fullmatch(r"# [\w.-]+\.ya?ml", first):
            (cwd / first[2:]).write_text(body)  # a file the walk names: written as the reader would
        elif lang == "bash":
            script.append(body)
        elif lang == "python":
            python.append(body)
    assert (cwd / VALUES).is_file(), f"the walk shows no `# {VALUES}` block"
    shims, log = dst / "bin", dst / "calls.jsonl"
    shims.mkdir()
    for cmd in RECORDERS:
        shim = shims / cmd
        shim.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "with open(os.environ['WALK_LOG'], 'a') as f:\n"
                        "    f.write(json.dumps({'cmd': os.path.basename(sys.argv[0]), "
                        "'argv': sys.argv[1:]}) + '\\n')\n")
        shim.chmod(0o755)
    env = {**ENV, "PATH": f"{shims}:{Path(sys.executable).parent}:/usr/bin:/bin",
           "PYTHONPATH": str(cwd), "WALK_LOG": str(log), "HOME": str(dst),
           "COAFLOW_K8S_CONFIG": "", "GX_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, f"the walk failed:\n{done.stdout}\n{done.stderr}"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return Walk(cwd, calls, python, text)


def flags(argv: list[str], known: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """Positional arguments and {flag: [values]}; ``known`` maps each flag the walk may use
    to "value" or "switch" (an unknown one fails: the page would say something unchecked)."""
    pos, opts, i = [], {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            name, eq, val = a.partition("=")
            assert name in known, f"{shlex.join(argv)}: {name} is not checked here"
            if known[name] == "value" and not eq:
                i, val = i + 1, argv[i + 1]
            opts.setdefault(name, []).append(val)
        else:
            pos.append(a)
        i += 1
    return pos, opts


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


HELM = {"-n": "value", "--namespace": "value", "-f": "value", "--values": "value",
        "--set": "value", "--version": "value", "--create-namespace": "switch",
        "--wait": "switch", "--timeout": "value"}


@dataclass
class Release:
    namespace: str
    values: dict
    docs: list[dict]
    revision: int


def replay(walk: Walk) -> dict:
    """Replay the recorded commands: the images built and pushed, every release rendered per
    revision, what kubectl created; and the upgrade problems met on the way."""
    helm = charts.helm()
    state = {"built": set(), "pushed": set(), "releases": {}, "external": {}, "created": {},
             "upgrades": [], "models": []}
    for call in walk.calls:
        cmd, argv = call["cmd"], call["argv"]
        if cmd == "docker":
            pos, opts = flags(argv[1:], {"-f": "value", "-t": "value"})
            if argv[0] == "build":
                assert (walk.cwd / opts["-f"][0]).is_file(), argv
                state["built"] |= set(opts["-t"])
            else:
                assert argv[0] == "push" and pos[0] in state["built"], argv
                state["pushed"].add(pos[0])
        elif cmd == "helm" and argv[:2] == ["dependency", "update"]:
            helm.dependency_update(walk.cwd / argv[2])
        elif cmd == "helm" and argv[0] in ("install", "upgrade"):
            (name, chart), opts = flags(argv[1:], HELM)
            values = {}
            for f in opts.get("-f", []) + opts.get("--values", []):
                values = merge(values, yaml.safe_load((walk.cwd / f).read_text()) or {})
            for s in opts.get("--set", []):
                values = merge(values, helm.parse_set_string(s))
            ns = (opts.get("-n") or opts.get("--namespace") or ["default"])[0]
            before = state["releases"].get(name)
            assert (argv[0] == "install") == (before is None), f"{argv[0]} of {name}"
            if not (walk.cwd / chart).is_dir():  # a chart of its own project: values recorded
                state["external"][name] = Release(ns, values, [], 1)
                continue
            revision = before.revision + 1 if before else 1
            docs = charts.render(walk.cwd / chart, values, name=name, namespace=ns,
                                 revision=revision)
            if before:
                state["upgrades"] += charts.upgrade_problems(before.docs, docs, ns)
            state["releases"][name] = Release(ns, values, docs, revision)
        elif cmd == "kubectl" and argv[0] == "create":
            pos, opts = flags(argv[1:], {"-n": "value", "--from-literal": "value",
                                         "--from-file": "value"})
            kind = {"secret": "Secret", "configmap": "ConfigMap", "namespace": "Namespace"}[pos[0]]
            name = pos[2] if kind == "Secret" else pos[1]
            data = dict(kv.partition("=")[::2] for kv in opts.get("--from-literal", []))
            for spec in opts.get("--from-file", []):
                k, _, path = spec.partition("=")
                data[k] = (walk.cwd / path).read_text()
            state["created"][(kind, (opts.get("-n") or [""])[0], name)] = data
        elif cmd == "kubectl" and argv[0] == "apply" and "-f" in argv:
            for doc in yaml.safe_load_all((walk.cwd / argv[argv.index("-f") + 1]).read_text()):
                if doc["kind"] == "Profile":  # a Kubeflow profile makes its namespace
                    state["created"][("Namespace", "", doc["metadata"]["name"])] = {}
        elif cmd == "curl" and "-d" in argv:
            state["models"].append(json.loads(argv[argv.index("-d") + 1])["model"])
    return state


# --- what the walk made, as objects -------------------------------------------------------------

@pytest.fixture(scope="module")
def walked(tmp_path_factory):
    walk = run_walk(tmp_path_factory.mktemp("walk"))
    return walk, replay(walk)


def install_values(walk: Walk) -> dict:
    return yaml.safe_load((walk.cwd / VALUES).read_text())


def settings(walk: Walk):
    """The stage pods' settings the values file implies (what KFP compiled with and the DAG's
    ConfigMap holds)."""
    from coaflow.orchestrate import k8s

    return k8s.load(walk.cwd / VALUES)


def pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    template = spec.get("template", {}).get("spec")
    if doc["kind"] == "Pod":
        return [spec]
    if doc["kind"] == "TrainJob":
        return [j["template"]["spec"]["template"]["spec"] for p in spec["runtimePatches"]
                for j in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]]
    return [template] if template else []


def containers(doc: dict) -> list[dict]:
    return [c for s in pod_specs(doc) for c in s.get("containers", []) + s.get("initContainers", [])]


def kfp_executors(walk: Walk) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((walk.cwd / "coaflow_pipeline.yaml").read_text())
    return (spec["deploymentSpec"]["executors"],
            platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"])


def airflow_pods(walk: Walk, state: dict) -> list[dict]:
    """Every stage pod of the DAG as Airflow builds it from the ConfigMap the walk made, and a
    TrainJob launcher pod."""
    from coaflow.contract import ORDER
    from coaflow.orchestrate import airflow as af
    from coaflow.orchestrate import airflow_pods as ap
    from tests.pods import pod_manifest

    (release,) = state["external"].values()
    (mount,) = release.values["volumeMounts"]
    (env,) = [e for e in release.values["env"] if e["name"] == "COAFLOW_K8S_CONFIG"]
    (key, content), = state["created"][("ConfigMap", release.namespace, "coaflow-k8s")].items()
    assert env["value"] == f"{mount['mountPath']}/{key}"  # the DAG finds the mounted file
    path = walk.cwd / "mounted-k8s.yaml"
    path.write_text(content)
    s = af.load_settings(env={"COAFLOW_AIRFLOW_MODE": "kubernetes", "COAFLOW_K8S_CONFIG": str(path)})
    return [pod_manifest(ap.pod_spec(stage, s, ["true"], launcher=launcher))
            for stage in ORDER for launcher in (False, True)], s


def trainjob(walk: Walk) -> dict:
    from coaflow.orchestrate import trainjob as tj

    return tj.manifest("sft", ["--config", "qwen3-0.6b-1gpu"], settings(walk), nodes=2,
                       gpus_per_node=8, name="coaflow-r1-sft")


def rendered(state: dict) -> list[tuple[str, dict]]:
    """(release, doc) of every object of every release's last revision."""
    return [(name, d) for name, r in state["releases"].items() for d in r.docs]


# --- the checks ----------------------------------------------------------------------------------

def test_every_image_is_one_the_build_pushed(walked):
    walk, state = walked
    pushed = state["pushed"]
    assert pushed, "the walk pushes no image"
    images = {(f"release {n}", d["metadata"]["name"], c["image"]) for n, d in rendered(state)
              for c in containers(d)}
    execs, _ = kfp_executors(walk)
    images |= {("KFP", name, e["container"]["image"]) for name, e in execs.items()}
    pods, s = airflow_pods(walk, state)
    images |= {("Airflow", p["metadata"]["labels"]["coaflow/stage"], c["image"]) for p in pods
               for c in p["spec"]["containers"]}
    images |= {("TrainJob", "sft", trainjob(walk)["spec"]["trainer"]["image"])}
    for name, release in state["external"].items():
        airflow = release.values["images"]["airflow"]
        images.add((f"release {name}", "airflow", f"{airflow['repository']}:{airflow['tag']}"))
    missing = sorted(i for i in images if i[2] not in pushed)
    assert not missing, f"pulled but never built and pushed: {missing}"
    assert len({i[2] for i in images}) == 4  # cpu, gpu, tracking, airflow
    sidecar = s.kubernetes.xcom_sidecar_image  # the one image not built here: pinned upstream
    assert sidecar.startswith("alpine:") and "@sha256:" in sidecar


def test_every_models_uri_and_served_name_is_the_registered_model(walked):
    from coaflow.config import load_config
    from coaflow.registry import model_name, parse_model_uri

    walk, state = walked
    s = settings(walk)
    registered = model_name(load_config(s.profile, s.overrides).run.name)
    assert registered == install_values(walk)["global"]["modelName"]
    uris = {v for _, d in rendered(state) for v in re.findall(r"models:/[^\s\"',]+",
                                                              json.dumps(d))}
    assert uris and {parse_model_uri(u)[0] for u in uris} == {registered}
    (serving,) = [d for _, d in rendered(state) if d["metadata"]["name"] == "coaflow-serving"
                  and d["kind"] == "Deployment"]
    assert f"--name={registered}" in serving["spec"]["template"]["spec"]["containers"][0]["args"]
    assert state["models"] == [registered]  # the page's request asks for it by that name
    # deploy's smoke test sends the registered name to the Deployment it patched
    cfg = load_config(s.profile, s.overrides)
    assert (cfg.deploy.target, cfg.deploy.kubernetes.deployment) == ("kubernetes",
                                                                     "coaflow-serving")
    assert cfg.deploy.kubernetes.service_url == "http://coaflow-serving.coaflow:8000/v1"


def test_one_namespace_holds_every_object_pod_trainjob_and_run(walked):
    walk, state = walked
    ns = install_values(walk)["global"]["namespace"]
    assert {r.namespace for r in state["releases"].values()} == {ns}
    assert all(d["metadata"].get("namespace", ns) == ns for _, d in rendered(state))
    s = settings(walk)
    assert s.namespace == ns and f"deploy.kubernetes.namespace={ns}" in s.overrides
    assert trainjob(walk)["metadata"]["namespace"] == ns
    pods, _ = airflow_pods(walk, state)
    assert {p["metadata"]["namespace"] for p in pods} == {ns}
    assert ("Namespace", "", ns) in state["created"]
    runs = [m.group(1) for code in walk.python for m in re.finditer(r'namespace="([^"]+)"', code)]
    assert runs == [ns]  # the KFP run the page starts


def test_the_work_volume_is_read_write_many_on_the_values_class(walked):
    walk, state = walked
    (pvc,) = [d for _, d in rendered(state) if d["kind"] == "PersistentVolumeClaim"
              and d["metadata"]["name"] == "coaflow-work"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cls = install_values(walk)["global"]["storageClass"]
    assert pvc["spec"]["storageClassName"] == cls
    assert f"`{cls}`" in walk.text or f"storageClass: {cls}" in walk.text
    storage = walk.text[walk.text.index("## Storage"):]
    for provisioner in ("efs.csi.aws.com", "filestore.csi.storage.gke.io", "file.csi.azure.com"):
        assert provisioner in storage


def test_the_serving_rollout_fits_one_gpu(walked):
    _, state = walked
    for _, d in rendered(state):
        if d["kind"] == "Deployment" and any("nvidia.com/gpu" in c["resources"].get("limits", {})
                                             for c in containers(d)):
            strategy = d["spec"].get("strategy", {"type": "RollingUpdate"})
            surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
            assert strategy["type"] == "Recreate" or surge == 0, d["metadata"]["name"]


def secret_reads(walk: Walk, state: dict) -> set[tuple[str, str | None]]:
    """(Secret, key) every container reads; key None: all of its keys (envFrom)."""
    reads = set()
    specs = [c for _, d in rendered(state) for c in containers(d)]
    pods, _ = airflow_pods(walk, state)
    specs += [c for p in pods for c in p["spec"]["containers"]]
    specs += containers(trainjob(walk)) + [{"env": trainjob(walk)["spec"]["trainer"]["env"]}]
    for c in specs:
        reads |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
                  for e in c.get("env") or [] if "secretKeyRef" in e.get("valueFrom", {})}
        reads |= {(e["secretRef"]["name"], None) for e in c.get("envFrom") or []
                  if "secretRef" in e}
    _, platform = kfp_executors(walk)
    reads |= {(s["secretName"], kv["secretKey"]) for ex in platform.values()
              for s in ex.get("secretAsEnv", []) for kv in s["keyToEnv"]}
    return reads


def test_every_secret_key_a_pod_reads_is_created_or_documented(walked):
    walk, state = walked
    created = {(name, k) for (kind, _, name), data in state["created"].items()
               if kind == "Secret" for k in data}
    created |= {(d["metadata"]["name"], k) for _, d in rendered(state) if d["kind"] == "Secret"
                for k in {**d.get("data", {}), **d.get("stringData", {})}}
    reads = secret_reads(walk, state)
    assert ("coaflow-secrets", "openai-api-key") in reads  # the stages and the teacher
    undocumented = sorted((s, k) for s, k in reads if (s, k) not in created and not (
        f"`{s}`" in walk.text and (k is None or f"`{k}`" in walk.text)))
    assert not undocumented, f"read, but neither created by the walk nor documented: {undocumented}"
    # the Secrets of MLflow for real use, read by the tracking server with production values
    for name, key in (("mlflow-db", "password"), ("mlflow-s3", "AWS_ACCESS_KEY_ID")):
        assert (name, key) in created


def test_no_two_releases_nor_kubectl_own_the_same_object(walked):
    walk, state = walked
    owner: dict = {}
    for name, r in state["releases"].items():
        for d in r.docs:
            k = charts.key(d, r.namespace)
            assert owner.setdefault(k, name) == name, f"{k}: {owner[k]} and {name}"
    clash = [k for k in state["created"] if k in owner]
    assert not clash, f"made by kubectl and by a release: {clash}"
    # the whole-run Job is an upgrade of the one release, not a second release of a chart
    assert list(state["releases"]) == ["coaflow"]
    assert state["releases"]["coaflow"].revision >= 2


def test_no_upgrade_of_the_walk_kills_or_breaks_a_job(walked):
    _, state = walked
    assert state["upgrades"] == []
    jobs = [d for _, d in rendered(state) if d["kind"] == "Job" and not charts.is_hook(d)]
    assert [j["metadata"]["name"] for j in jobs] == ["coaflow-run-1"]
    assert jobs[0]["metadata"]["annotations"][charts.KEEP] == "keep"


def test_the_run_job_and_the_engines_start_from_the_same_overrides(walked):
    walk, state = walked
    (job,) = [d for _, d in rendered(state) if d["kind"] == "Job" and not charts.is_hook(d)]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    s = settings(walk)
    assert [a.removeprefix("--set=") for a in args if a.startswith("--set=")] == s.overrides
    assert f"--profile={s.profile}" in args
    spec, _ = yaml.safe_load_all((walk.cwd / "coaflow_pipeline.yaml").read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == s.profile
    sites = [t["inputs"]["parameters"]["site"]["runtimeValue"]["constant"]
             for t in spec["root"]["dag"]["tasks"].values() if "site" in t["inputs"]["parameters"]]
    assert sites and all(site == s.overrides for site in sites)
    teacher = [o for o in s.overrides if o.startswith("synthesize.llm.base_url=")]
    assert teacher == ["synthesize.llm.base_url=http://coaflow-teacher.coaflow:8000/v1"]
    svc = [d for _, d in rendered(state) if d["kind"] == "Service"
           and d["metadata"]["name"] == "coaflow-teacher"]
    assert svc and svc[0]["spec"]["ports"][0]["port"] == 8000


def test_the_airflow_role_binds_the_workers_of_the_airflow_release(walked):
    walk, state = walked
    ((name, release),) = state["external"].items()
    assert release.values["airflowVersion"] == "3.3.2"
    assert "apache/airflow:3.3.2-" in (ROOT / "images" / "airflow.Dockerfile").read_text()
    (binding,) = [d for _, d in rendered(state) if d["kind"] == "RoleBinding"
                  and d["metadata"]["name"].endswith("-airflow-pods")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{name}-worker",
                                    "namespace": release.namespace}]


def test_the_page_names_what_it_installs_with_versions(walked):
    walk, _ = walked
    installs = [c["argv"] for c in walk.calls if c["cmd"] == "kubectl" and "-k" in c["argv"]]
    assert installs and all("?ref=v2.3.0" in a[-1] for a in installs)  # the Trainer's release
    (airflow,) = [a for a in walk.of("helm") if a[:2] == ["install", "airflow"]]
    assert airflow[airflow.index("--version") + 1] == "1.22.0"

