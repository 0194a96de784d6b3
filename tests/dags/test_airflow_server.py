"""A real Airflow on loopback (api-server + scheduler + dag-processor, SQLite, LocalExecutor),
triggered the way people do it: through the REST API with a conf (token from the API's token
endpoint), and through the UI's trigger form in headless Chromium (Debian's package). The
screenshot of the finished run's grid is saved in $COAFLOW_TEST_ARTIFACTS (else a temp folder)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from coaflow.orchestrate.airflow import safe_run_id
from tests import requires
from tests.dags.conftest import ROOT, SMALL_CONF, SMALL_TASKS, airflow_env, assert_run_succeeded

DAG_ID = "coaflow_retrain"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Airflow:
    """The three Airflow services in a temp AIRFLOW_HOME, each in its own process group."""

    def __init__(self, home: Path, workdir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        self.home = home
        self.workdir = workdir
        self.env = airflow_env(
            home, workdir,
            AIRFLOW__API__PORT=str(self.port), AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__BASE_URL=self.url, AIRFLOW__API__WORKERS="1",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.url}/execution/",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(home / "passwords.json"),
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__PARALLELISM="2",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="30")
        (home / "passwords.json").write_text(json.dumps({"admin": self.password}))
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env,
                       check=True, capture_output=True, timeout=300, cwd=ROOT)
        for name in ("api-server", "scheduler", "dag-processor"):
            log = open(self.home / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "airflow", name], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True))
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            assert not dead, self.logs()
            try:
                if self.api("GET", f"/api/v2/dags/{DAG_ID}").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise AssertionError("Airflow did not serve the DAG in 240 s\n" + self.logs())

    def stop(self) -> None:
        for p in self.procs:
            with _quiet():
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with _quiet():
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.home.glob("*.log")))

    def token(self) -> str:
        r = httpx.post(f"{self.url}/auth/token", json={"username": "admin",
                                                        "password": self.password}, timeout=30)
        r.raise_for_status()
        return r.json()["access_token"]

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token()}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def wait_for_run(self, run_id: str, timeout: float = 420) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(3)
        raise AssertionError(f"run {run_id} did not finish in {timeout} s\n" + self.logs())

    def task_states(self, run_id: str) -> dict[str, str]:
        tis = self.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()
        return {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is ProcessLookupError


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, shared_workdir):
    server = Airflow(tmp_path_factory.mktemp("airflow-server"), shared_workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _assert_params_reached_the_stages(workdir: Path, run_id: str) -> None:
    run_dir = workdir / "runs" / safe_run_id(run_id)
    synth = json.loads((run_dir / "synthesize" / "result.json").read_text())
    assert synth["metrics"]["trajectories"] == SMALL_TASKS  # the profile's default is 600


@pytest.mark.slow
def test_rest_trigger_with_conf(airflow):
    r = airflow.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                    json={"logical_date": None, "conf": SMALL_CONF})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    start = time.monotonic()
    run = airflow.wait_for_run(run_id)
    print(f"REST-triggered run: {time.monotonic() - start:.0f} s")
    assert run["state"] == "success", (airflow.task_states(run_id), airflow.logs())
    assert run["conf"] == SMALL_CONF
    assert_run_succeeded(airflow.task_states(run_id))
    _assert_params_reached_the_stages(airflow.workdir, run_id)


@pytest.mark.slow
def test_rest_rejects_a_bad_param(airflow):
    r = airflow.api("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                    json={"logical_date": None, "conf": {"epochs": -1}})
    assert r.status_code == 400 and "epochs" in r.text, r.text
    no_token = httpx.get(f"{airflow.url}/api/v2/dags/{DAG_ID}", timeout=30)
    assert no_token.status_code == 401


def _ui_overrides() -> list[str]:
    """SMALL_CONF as a person types it in the form: the suites as one more override line."""
    suites = ", ".join(f"{k}: {v}" for k, v in SMALL_CONF["tasks_per_suite"].items())
    return SMALL_CONF["overrides"] + [f"synthesize.suites={{{suites}}}"]


@pytest.mark.slow
def test_browser_triggers_from_the_form_and_shows_the_grid(airflow, artifacts):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=requires.chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{airflow.url}/dags/{DAG_ID}", timeout=120_000)
        page.fill("input[name=username]", "admin")  # the login page comes first
        page.fill("input[name=password]", airflow.password)
        page.keyboard.press("Enter")
        page.wait_for_url(f"**/dags/{DAG_ID}", timeout=120_000)
        before = {r["dag_run_id"] for r in airflow.api(
            "GET", f"/api/v2/dags/{DAG_ID}/dagRuns").json()["dag_runs"]}

        page.get_by_role("button", name="Trigger").first.click()
        form = page.get_by_role("dialog")
        form.locator("input[name=element_seed]").fill(str(SMALL_CONF["seed"]))
        form.locator("textarea[name=element_overrides]").fill("\n".join(_ui_overrides()))
        form.get_by_role("button", name="Trigger").last.click()

        deadline = time.monotonic() + 60
        new: set[str] = set()
        while not new and time.monotonic() < deadline:
            runs = airflow.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns").json()["dag_runs"]
            new = {r["dag_run_id"] for r in runs} - before
            time.sleep(1)
        assert len(new) == 1, "the form did not start a run"
        run_id = new.pop()
        run = airflow.wait_for_run(run_id)
        assert run["state"] == "success", (airflow.task_states(run_id), airflow.logs())
        assert run["conf"]["seed"] == SMALL_CONF["seed"]
        assert run["conf"]["overrides"] == _ui_overrides()
        _assert_params_reached_the_stages(airflow.workdir, run_id)

        page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}", timeout=120_000)
        page.wait_for_load_state("networkidle")
        page.get_by_text("sft").first.wait_for(timeout=60_000)
        shot = artifacts / "airflow-grid.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000
