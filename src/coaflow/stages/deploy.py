"""deploy: serve the champion; smoke-test it; fall back to ``previous`` when the test fails.

\b
    coaflow deploy --profile tiny --run-id RUN          # after register, in the same run
    coaflow undeploy --workdir work                      # stop the managed local server

``target: local`` runs ``coaflow serve models:/<name>/<champion version>`` as a managed background
process (pid, port and version in ``<workdir>/serving/<name>/server.json``, logs beside it). A new
version binds the same port with SO_REUSEPORT while the old server still answers, and the old one
is stopped once the new one is healthy: the port is never dropped. The same version already
running is kept. ``target: kubernetes`` patches the serving Deployment (``helm/coaflow-serving``)
to the new model URI with the kubernetes client and waits for the rollout. Either way a smoke
test runs whole agent episodes on test-split tasks through the OpenAI endpoint (coaflow.agent's
HTTP backend) and checks their tool calls; a failed smoke test moves ``champion`` back to ``previous`` and serves that.
``target: none`` only records what would be served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import httpx
from pydantic import Field

from coaflow.contract import Context, PipelineError, Result
from coaflow.errors import CoaflowError, ServiceUnavailable, UserError
from coaflow.section import Section
from coaflow.serving.server import PARENT_FD

NAME = "deploy"
NEEDS = ("register",)
RESUMABLE = False
CACHE = False  # acts on outside state (a process, a cluster) every time


class KubernetesTarget(Section):
    namespace: str = Field("coaflow", description="namespace of the serving Deployment")
    deployment: str = Field("coaflow-serving", description="Deployment name (helm/coaflow-serving "
                            "names it <release>-coaflow-serving unless fullnameOverride)")
    container: str = Field("server", description="container that serves the model")
    image: str | None = Field(None, description="image to roll out with the model; null: keep")
    service_url: str | None = Field(None, description="OpenAI base URL of the Service for the "
                                    "smoke test (e.g. http://coaflow-serving.coaflow:8000/v1)")
    context: str | None = Field(None, description="kubeconfig context; null: in-cluster config, "
                                "else the current context")
    rollout_timeout_s: float = Field(900, gt=0, description="wait this long for the rollout")


class Config(Section):
    target: Literal["local", "kubernetes", "none"] = Field(
        "local", description="local: a managed `coaflow serve` process; kubernetes: patch the "
        "serving Deployment; none: record only")
    host: str = Field("127.0.0.1", description="local: interface to listen on")
    port: int = Field(8000, ge=1, le=65535, description="local: port to serve on")
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="local: serving engine (auto: vLLM on a GPU, else transformers)")
    threads: int = Field(0, ge=0, description="local: torch CPU threads of the transformers "
                         "engine (0: torch's default)")
    startup_timeout_s: float = Field(300, gt=0, description="local: wait this long for health")
    smoke_suites: list[str] = Field(default_factory=lambda: ["kbqa", "calc"],
                                    description="suites whose test questions the smoke test asks")
    smoke_tasks: int = Field(2, ge=0, description="test questions per suite (0: no smoke test)")
    smoke_min_tool_call_share: float = Field(
        0.5, ge=0, le=1, description="least share of smoke episodes with well-formed calls to "
        "the suite's tools")
    smoke_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens per assistant turn; null: the budget the served "
        "version was evaluated within (its coaflow.budget tag), else agent.budget's defaults")
    smoke_max_turns: int | None = Field(None, ge=1, description="assistant turns per smoke "
                                        "episode; null: as smoke_max_tokens")
    api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the endpoint's key "
                             "(kubernetes target; the local server needs none)")
    kubernetes: KubernetesTarget = Field(default_factory=KubernetesTarget,
                                         description="the kubernetes target")


# --- the smoke test -------------------------------------------------------------------------

def smoke_budgets(cfg: Config, version) -> dict:
    """Each smoke suite's budget: the configured one, else the one the served version was
    evaluated within (``register.BUDGET_TAG``), else ``agent.budget.DEFAULTS``."""
    from coaflow.agent.budget import Budget, default_budget
    from coaflow.registry import BUDGET_TAG

    judged = json.loads((version.tags or {}).get(BUDGET_TAG, "{}")) if version else {}
    out = {}
    for suite in cfg.smoke_suites:
        known = Budget(*judged[suite]) if suite in judged else default_budget(suite)
        out[suite] = Budget(cfg.smoke_max_turns or known.max_turns,
                            cfg.smoke_max_tokens or known.max_new_tokens)
    return out


def smoke_test(base_url: str, model: str, cfg: Config, seed: int = 0,
               budgets: dict | None = None) -> dict:
    """Whole agent episodes on test-split tasks through the endpoint (``coaflow.agent``'s HTTP
    backend, prompted exactly as training and evaluate prompt the model, the tool schemas sent as
    ``tools``, real tool results): every episode must run without an endpoint error, and enough of them must make a well-formed call to one of the suite's
    tools. Success is recorded, not required (a tiny student solves few whole tasks)."""
    from coaflow.agent import OpenAIBackend, category, run_episodes
    from coaflow.envs import make_tasks

    tasks = [t for s in cfg.smoke_suites for t in make_tasks(s, "test", cfg.smoke_tasks, seed=seed)]
    try:
        backend = OpenAIBackend(base_url, model, os.environ.get(cfg.api_key_env) or None,
                                concurrency=8, timeout_s=120, max_retries=2)
        trajs = run_episodes(backend, tasks, budgets=budgets or smoke_budgets(cfg, None),
                             seed=seed)
    except (CoaflowError, httpx.HTTPError, OSError) as e:  # the endpoint failing: the finding
        return {"passed": False, "n": len(tasks), "tool_call_share": 0.0, "success_share": 0.0,
                "detail": f"the endpoint failed: {type(e).__name__}: {str(e)[:300]}", "rows": []}
    rows = [{"suite": t.task.suite, "question": t.task.question, "category": category(t),
             "tool_calls": len(t.tool_calls()), "correct": bool(t.outcome.correct)}
            for t in trajs]
    n = len(rows)
    share = sum(r["tool_calls"] > 0 and r["category"] != "malformed_call" for r in rows) / n \
        if n else 1.0
    solved = sum(r["correct"] for r in rows) / n if n else 0.0
    return {"passed": share >= cfg.smoke_min_tool_call_share, "n": n, "tool_call_share": share,
            "success_share": solved,
            "detail": f"{share:.0%} of {n} episodes made well-formed tool calls (need "
                      f"{cfg.smoke_min_tool_call_share:.0%}); {solved:.0%} solved", "rows": rows}


# --- the local target: a managed `coaflow serve` process --------------------------------------

def state_file(workdir: str | Path, name: str) -> Path:
    return Path(workdir) / "serving" / name / "server.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        return not os.waitpid(pid, os.WNOHANG)[0]
    except ChildProcessError:
        return True


def _health(url: str) -> dict | None:
    try:
        r = httpx.get(f"{url}/health", timeout=3)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def process_identity(pid: int) -> str | None:
    """What tells process ``pid`` apart from a later one that reuses its number: its start time
    (clock ticks since boot, field 22 of ``/proc/<pid>/stat``) and its command line. None when
    the process is gone or ``/proc`` is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    start = stat.rsplit(")", 1)[-1].split()[19]  # the name in (...) may hold spaces
    argv = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return f"{start} {argv}"


def _ours(state: dict) -> bool:
    """Whether the pid in ``state`` is still the server ``deploy`` started: the identity
    recorded at launch matches, or (a record without one) the server at its port says so."""
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 1 or not _alive(pid):
        return False
    if state.get("identity"):
        return process_identity(pid) == state["identity"]
    h = _health(f"http://{state.get('host')}:{state.get('port')}")
    return bool(h) and h.get("pid") == pid


def _load_state(f: Path) -> dict | None:
    """``server.json``, or None when absent; a corrupt one is one line naming the file."""
    if not f.exists():
        return None
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{f}: not a server record ({e}); remove it if no server runs") from None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        raise UserError(f"{f}: not a server record (no pid); remove it if no server runs")
    return state


def read_state(workdir, name: str) -> dict | None:
    """The record of the managed server of ``name`` while that very process runs (a server
    still starting whose deploy died is gone with it: the one it was replacing, if any)."""
    state = _load_state(state_file(workdir, name))
    for s in (state, (state or {}).get("previous")):
        if isinstance(s, dict) and _ours(s):
            return s
    return None


def _write_state(workdir, name: str, state: dict | None) -> None:
    f = state_file(workdir, name)
    if state is None:
        f.unlink(missing_ok=True)
        return
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, f)


def stop(pid: int, timeout_s: float = 30) -> None:
    """SIGTERM (uvicorn finishes the requests in flight), SIGKILL after ``timeout_s``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def start_local(cfg: Config, workdir: Path, name: str, version: int, registry_uri: str) -> dict:
    """Serve ``models:/name/version`` on ``cfg.port``, replacing the managed server there."""
    old = read_state(workdir, name)
    url = f"http://{cfg.host}:{cfg.port}"
    if old and old["version"] == version and old["port"] == cfg.port and _health(url):
        return old  # already serving this version
    if old is None and not _port_free(cfg.host, cfg.port):
        raise UserError(f"deploy.port: port {cfg.port} on {cfg.host} is in use by a process "
                        "coaflow does not manage; pick another port or stop it")
    from coaflow.registry import version_uri

    folder = state_file(workdir, name).parent
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"server-v{version}.log"
    uri = version_uri(name, version)
    argv = [sys.executable, "-m", "coaflow.cli", "serve", uri,
            "--host", cfg.host, "--port", str(cfg.port), "--engine", cfg.engine, "--name", name,
            "--reuse-port", "--workdir", str(workdir), "--registry-uri", registry_uri,
            "--threads", str(cfg.threads)]
    # the server binds its port only after reading R on this pipe (it is recorded by then), and
    # stops if the pipe closes before H (this process died before handing it over)
    watch, tell = os.pipe()
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                pass_fds=(watch,), env={**os.environ, PARENT_FD: str(watch)},
                                start_new_session=True)  # no terminal signal reaches it
    os.close(watch)
    state = {"pid": proc.pid, "identity": process_identity(proc.pid),
             "host": cfg.host, "port": cfg.port, "version": version,
             "model": uri, "log": str(log), "endpoint": f"{url}/v1",
             "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    handed = False
    try:
        _write_state(workdir, name, {**state, "starting": True, "previous": old})
        os.write(tell, b"R")
        deadline = time.time() + cfg.startup_timeout_s
        while True:  # a health answer from the *new* process (the old one shares the port)
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise UserError(f"deploy: the server for {name} version {version} exited with "
                                f"{proc.returncode}: {tail[0]} (log: {log})")
            h = _health(url)
            if h and h.get("pid") == proc.pid:
                break
            if time.time() > deadline:
                raise ServiceUnavailable(f"deploy: {name} version {version} not healthy on "
                                         f"{url} after {cfg.startup_timeout_s:.0f}s (log: {log})")
            time.sleep(0.3)
        _write_state(workdir, name, state)
        os.write(tell, b"H")
        handed = True
    finally:  # a failure, an exception, SIGTERM: the new server goes, the old record returns
        os.close(tell)
        if not handed:
            stop(proc.pid, 10)
            _write_state(workdir, name, old)
    if old:
        stop(old["pid"])
    return state


def undeploy(workdir: str | Path, name: str, log=print) -> dict | None:
    """Stop the managed local server of ``name``; returns its state (None if none ran). A pid
    that is no longer the server deploy started (it exited and the number was reused) is never
    signalled: the record is removed and None returned."""
    f = state_file(workdir, name)
    state = _load_state(f)
    if state is None:
        return None
    stopped = None
    for s in (state.get("previous"), state):  # a replacement may have been starting
        if isinstance(s, dict) and _ours(s):
            stop(s["pid"])
            stopped = s
    if stopped is None:
        log(f"the server of {name} (pid {state['pid']}) is gone; removing its record {f}")
    f.unlink(missing_ok=True)
    return stopped


# --- the kubernetes target ----------------------------------------------------------------------

def _apps_api(k: KubernetesTarget):
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(context=k.context)
        except (config.ConfigException, OSError) as e:
            raise UserError(f"deploy.kubernetes: no cluster configuration: {e}") from None
    return client.AppsV1Api()


def rollout_kubernetes(k: KubernetesTarget, model_uri: str, version: int, apps=None,
                       poll_s: float = 5.0) -> dict:
    """Patch the Deployment to serve ``model_uri`` and wait until every replica runs it."""
    from kubernetes.client.exceptions import ApiException

    apps = apps or _apps_api(k)
    # the chart's containers read MODEL_URI from this pod annotation (downward API): changing
    # it rolls the pods, and the init container fetches the new version
    notes = {"coaflow.io/model-uri": model_uri, "coaflow.io/model-version": str(version)}
    template: dict = {"metadata": {"annotations": notes}}
    if k.image:
        template["spec"] = {"containers": [{"name": k.container, "image": k.image}],
                            "initContainers": [{"name": "fetch-model", "image": k.image}]}
    patch = {"metadata": {"annotations": notes}, "spec": {"template": template}}
    where = f"deployment {k.namespace}/{k.deployment}"
    try:
        patched = apps.patch_namespaced_deployment(k.deployment, k.namespace, patch)
        generation = patched.metadata.generation
        deadline = time.time() + k.rollout_timeout_s
        while True:
            d = apps.read_namespaced_deployment_status(k.deployment, k.namespace)
            want, s = d.spec.replicas or 0, d.status
            if ((s.observed_generation or 0) >= generation and (s.updated_replicas or 0) == want
                    and (s.available_replicas or 0) == want and (s.replicas or 0) == want):
                return {"deployment": f"{k.namespace}/{k.deployment}", "generation": generation, "replicas": want}
            if time.time() > deadline:
                raise ServiceUnavailable(f"{where}: rollout of {model_uri} not done after "
                                         f"{k.rollout_timeout_s:.0f}s ({s.updated_replicas or 0}"
                                         f"/{want} updated, {s.available_replicas or 0} available)")
            time.sleep(poll_s)
    except ApiException as e:
        if e.status in (401, 403, 404, 409, 422):
            raise UserError(f"{where}: the cluster refused the change: {e.status} "
                            f"{e.reason}") from None
        raise ServiceUnavailable(f"{where}: Kubernetes API error {e.status} {e.reason}") from None


# --- the stage ------------------------------------------------------------------------------

def run(cfg: Config, ctx: Context) -> Result:
    from coaflow.registry import PREVIOUS, Registry, version_uri

    name = ctx.input("register").summary.get("model")
    registry = Registry(ctx.registry_uri)
    champ = registry.champion(name) if name else None
    if champ is None:
        raise PipelineError(f"deploy: {name or 'the model'} has no champion in "
                            f"{registry.uri}: nothing to serve (register promoted nothing)")
    if cfg.target == "none":
        return Result(summary={"target": "none", "model": name, "version": champ.version})

    def serve(version: int) -> tuple[str, dict]:
        if cfg.target == "local":
            st = start_local(cfg, Path(ctx.run.workdir), name, version, registry.uri)
            return st["endpoint"], st
        st = rollout_kubernetes(cfg.kubernetes, version_uri(name, version), version)
        if not cfg.kubernetes.service_url:
            raise UserError("deploy.kubernetes.service_url: needed for the smoke test")
        return cfg.kubernetes.service_url, st

    endpoint, state = serve(champ.version)
    smoke = smoke_test(endpoint, name, cfg, ctx.run.seed, smoke_budgets(cfg, champ)) \
        if cfg.smoke_tasks else \
        {"passed": True, "n": 0, "detail": "no smoke test (deploy.smoke_tasks: 0)"}
    (ctx.out / "smoke.json").write_text(json.dumps(smoke, indent=2))
    summary = {"target": cfg.target, "model": name, "version": champ.version,
               "endpoint": endpoint, "smoke": {k: v for k, v in smoke.items() if k != "rows"},
               "rolled_back": False, "state": state}
    if not smoke["passed"]:
        reason = f"smoke test of version {champ.version} failed: {smoke['detail']}"
        if registry.alias(name, PREVIOUS) is None:
            if cfg.target == "local":
                undeploy(ctx.run.workdir, name)
            raise PipelineError(f"deploy: {reason}; there is no previous version to roll back "
                                "to, so nothing is served")
        now, _ = registry.rollback(name, reason)
        endpoint, state = serve(now.version)
        os.replace(ctx.out / "smoke.json", ctx.out / f"smoke-v{champ.version}-failed.json")
        smoke = smoke_test(endpoint, name, cfg, ctx.run.seed, smoke_budgets(cfg, now))
        (ctx.out / "smoke.json").write_text(json.dumps(smoke, indent=2))
        summary.update(rolled_back=True, reason=reason, version=now.version, endpoint=endpoint,
                       state=state, smoke={k: v for k, v in smoke.items() if k != "rows"})
        if not smoke["passed"]:
            raise PipelineError(f"deploy: {reason}; rolled back to version {now.version}, whose "
                                f"smoke test failed too: {smoke['detail']} (served at {endpoint})")
        ctx.tracker.set_tags({"coaflow.rolled_back": f"{champ.version}->{now.version}"})
    ctx.tracker.log_artifact(ctx.out / "smoke.json")
    return Result(outputs={"endpoint": endpoint, "smoke": str(ctx.out / "smoke.json")},
                  metrics={"version": float(summary["version"]),
                           "smoke_tool_call_share": float(smoke.get("tool_call_share", 1.0)),
                           "rolled_back": float(summary["rolled_back"])}, summary=summary)
