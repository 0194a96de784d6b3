"""The deploy stage: a managed local server for the champion, replaced in place, smoke-tested
through the OpenAI endpoint, rolled back to ``previous`` when the smoke test fails, stopped by
``coaflow undeploy``; the kubernetes target against a mocked API (no cluster here)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest

from coaflow.config import load_config  # noqa: E402
from coaflow.contract import Result  # noqa: E402
from coaflow.errors import ServiceUnavailable, UserError  # noqa: E402
from coaflow.registry import Registry  # noqa: E402
from coaflow.runner import execute  # noqa: E402
from coaflow.stages import deploy  # noqa: E402
from tests.serving.serve_fixtures import SYSTEM, free_port
from tests.stages import registry_fixtures as rf

NAME, MODEL = "d", "d-agent"


def _deploy(work, port, register_dir, *overrides):
    cfg = load_config("tiny", [f"run.workdir={work}", f"run.name={NAME}", f"deploy.port={port}",
                               "deploy.engine=transformers", "deploy.smoke_suites=[kbqa]",
                               "deploy.smoke_tasks=2", "deploy.smoke_max_tokens=40", "deploy.smoke_max_turns=2",
                               *overrides])
    return execute("deploy", cfg, work / "runs" / "r" / "deploy", {"register": register_dir},
                   log=lambda *_: None)


@pytest.mark.slow
def test_local_deploy_replaces_and_rolls_back(tmp_path, monkeypatch, tool_model, tiny_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = (tmp_path / "work").resolve()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    reg = Registry(uri)
    info = {"system_prompt": SYSTEM}
    reg.register(MODEL, tool_model, tags={}, info=info, experiment=NAME)  # v1: makes tool calls
    reg.promote(MODEL, 1, "test")
    registered = rf.stage_folder(tmp_path / "register", Result(summary={
        "model": MODEL, "registry_uri": uri, "promoted": True, "version": 1}), "reg-key")
    port = free_port()
    try:
        first = _deploy(work, port, registered)
        assert first.summary["version"] == 1 and not first.summary["rolled_back"]
        assert first.outputs["endpoint"] == f"http://127.0.0.1:{port}/v1"
        assert first.summary["smoke"]["passed"] and first.summary["smoke"]["n"] == 2
        pid1 = deploy.read_state(work, MODEL)["pid"]

        # the same version again: the running server is kept
        assert _deploy(work, port, registered).summary["state"]["pid"] == pid1

        # v2 never learned to call tools: its smoke test fails, champion and server go back to v1
        reg.register(MODEL, tiny_dir, tags={}, info=info, experiment=NAME)
        reg.promote(MODEL, 2, "test")
        back = _deploy(work, port, registered)
        assert back.summary["rolled_back"] and back.summary["version"] == 1
        assert "smoke test of version 2 failed" in back.summary["reason"]
        assert reg.champion(MODEL).version == 1
        state = deploy.read_state(work, MODEL)
        assert state["version"] == 1 and state["pid"] != pid1 and not deploy._alive(pid1)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["pid"] == state["pid"]
        smoke = json.loads((work / "runs" / "r" / "deploy" / "smoke.json").read_text())
        assert smoke["passed"]  # the restored version, tested again
        failed = json.loads((work / "runs" / "r" / "deploy" / "smoke-v2-failed.json").read_text())
        assert not failed["passed"] and failed["tool_call_share"] == 0
    finally:
        stopped = deploy.undeploy(work, MODEL)
    assert stopped is not None and not deploy._alive(stopped["pid"])
    assert deploy.read_state(work, MODEL) is None


def test_no_champion_and_a_taken_port_are_clear_errors(tmp_path, monkeypatch, tiny_dir):
    import socket

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work = (tmp_path / "work").resolve()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    reg = Registry(uri)
    reg.register(MODEL, tiny_dir, tags={}, info={}, experiment=NAME)
    registered = rf.stage_folder(tmp_path / "register", Result(summary={
        "model": MODEL, "registry_uri": uri}), "reg-key")
    with pytest.raises(UserError, match="has no champion"):
        _deploy(work, free_port(), registered)
    reg.promote(MODEL, 1, "test")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(UserError, match="in use by a process coaflow does not manage"):
            _deploy(work, held.getsockname()[1], registered)
    none = _deploy(work, free_port(), registered, "deploy.target=none")
    assert none.summary == {"target": "none", "model": MODEL, "version": 1}


class FakeApps:
    """AppsV1Api as far as the rollout uses it: the patch is recorded, the rollout completes
    after ``ready_after`` status reads (or never), or the patch is refused."""

    def __init__(self, ready_after: int = 2, refuse: int | None = None):
        self.patches, self.reads, self.ready_after, self.refuse = [], 0, ready_after, refuse

    def patch_namespaced_deployment(self, name, namespace, body):
        from kubernetes.client.exceptions import ApiException

        if self.refuse:
            raise ApiException(status=self.refuse, reason="Forbidden")
        self.patches.append((name, namespace, body))
        return SimpleNamespace(metadata=SimpleNamespace(generation=len(self.patches) + 1))

    def read_namespaced_deployment_status(self, name, namespace):
        self.reads += 1
        done = self.reads >= self.ready_after
        status = SimpleNamespace(observed_generation=len(self.patches) + 1, replicas=2,
                                 updated_replicas=2 if done else 1,
                                 available_replicas=2 if done else 1)
        return SimpleNamespace(spec=SimpleNamespace(replicas=2), status=status)


def test_kubernetes_rollout_patches_and_waits():
    k = deploy.KubernetesTarget(image="ghcr.io/x/coaflow-gpu:1.2", rollout_timeout_s=5)
    apps = FakeApps(ready_after=3)
    out = deploy.rollout_kubernetes(k, "models:/m-agent/4", 4, apps, poll_s=0.01)
    assert out == {"deployment": "coaflow/coaflow-serving", "generation": 2, "replicas": 2}
    assert apps.reads == 3
    name, ns, body = apps.patches[0]
    assert (name, ns) == ("coaflow-serving", "coaflow")
    pod = body["spec"]["template"]
    assert pod["metadata"]["annotations"]["coaflow.io/model-version"] == "4"
    assert pod["metadata"]["annotations"]["coaflow.io/model-uri"] == "models:/m-agent/4"
    assert pod["spec"]["containers"] == [{"name": "server", "image": "ghcr.io/x/coaflow-gpu:1.2"}]
    with pytest.raises(UserError, match="refused the change: 403 Forbidden"):
        deploy.rollout_kubernetes(k, "models:/m-agent/4", 4, FakeApps(refuse=403))
    slow = deploy.KubernetesTarget(rollout_timeout_s=0.05)
    with pytest.raises(ServiceUnavailable, match="1/2 updated"):
        deploy.rollout_kubernetes(slow, "models:/m-agent/4", 4, FakeApps(ready_after=10 ** 6),
                                  poll_s=0.01)


# --- issue 32: a managed server is recorded before it answers and dies with its deploy ---------

def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    from pathlib import Path

    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return b""


def _gone(pid: int, within: float) -> bool:
    import time

    deadline = time.time() + within
    while time.time() < deadline:
        if not deploy._alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_a_managed_server_answers_only_once_recorded_and_stops_with_its_deploy(tiny_dir,
                                                                                tmp_path):
    """The pipe ``deploy`` hands its server: no port before ``R`` (deploy has written
    server.json by then), and the pipe closing before ``H`` stops it (deploy died)."""
    import os
    import subprocess
    import sys
    import time

    from coaflow.serving.server import PARENT_FD
    from tests.serving.serve_fixtures import env

    port = free_port()
    watch, tell = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "coaflow.cli", "serve", str(tiny_dir),
                             "--port", str(port), "--engine", "transformers", "--name", "t",
                             "--workdir", str(tmp_path), "--threads", "1"],
                            env={**env(), PARENT_FD: str(watch)}, pass_fds=(watch,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(watch)
    url = f"http://127.0.0.1:{port}/health"
    try:
        deadline = time.time() + 20  # the tiny model loads in a few seconds: it would answer
        while time.time() < deadline:
            with pytest.raises(httpx.HTTPError):
                httpx.get(url, timeout=1)
            time.sleep(0.5)
        os.write(tell, b"R")
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url, timeout=1).json()["pid"] == proc.pid:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            pytest.fail(f"not serving after R: {proc.stderr.read()[-1000:]}")
        os.close(tell)  # the deploy is gone before handing the server over
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _registered(tmp_path, model):
    work = (tmp_path / "work").resolve()
    uri = f"sqlite:///{work / 'mlflow.db'}"
    reg = Registry(uri)
    reg.register(MODEL, model, tags={}, info={"system_prompt": SYSTEM}, experiment=NAME)
    reg.promote(MODEL, 1, "test")
    registered = rf.stage_folder(tmp_path / "register", Result(summary={
        "model": MODEL, "registry_uri": uri, "promoted": True, "version": 1}), "reg-key")
    return work, registered


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_deploy_killed_while_its_server_starts_leaves_no_server(tmp_path, monkeypatch,
                                                                  tiny_dir, sig):
    """``kill`` the deploy while its server loads: the server goes too, nothing is left for
    ``undeploy`` to miss (it kept answering /health with no server.json); SIGTERM ends deploy
    with one line and 143 (it printed "Aborted!" and exited 1)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.serving.serve_fixtures import env

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    work, registered = _registered(tmp_path, tiny_dir)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "coaflow.cli", "stage", "deploy", "--config", "tiny",
         "--out", str(tmp_path / "deploy"), "--input", f"register={registered}",
         "--set", f"run.workdir={work}", "--set", f"run.name={NAME}",
         "--set", f"deploy.port={port}", "--set", "deploy.engine=transformers",
         "--set", "deploy.smoke_tasks=0", "--set", "deploy.threads=1"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, server = time.time() + 300, None
    try:
        while server is None and time.time() < deadline and proc.poll() is None:
            server = next((c for c in _children(proc.pid) if b"serve" in _cmdline(c)), None)
            time.sleep(0.05)
        assert server, f"deploy started no server: {proc.communicate()}"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
        assert _gone(server, 60), "the server outlived its deploy"
    finally:  # whatever failed: no deploy and no server of this test left running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server and deploy._alive(server):
            os.kill(server, signal.SIGKILL)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert deploy.read_state(work, MODEL) is None
    assert deploy.undeploy(work, MODEL, log=lambda *_: None) is None
    if sig == "SIGTERM":
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 143, err[-2000:]
        assert "Aborted" not in err and "Traceback" not in err, err[-2000:]
        assert "terminated by signal 15" in lines[-1]
