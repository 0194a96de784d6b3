"""The LLM teacher against a real local HTTP server speaking the OpenAI chat API."""

import os
import signal
import subprocess
import sys
import time

import pytest

from coaflow.agent.openai import EndpointError
from coaflow.contract import PipelineError
from coaflow.envs import make_tasks
from coaflow.schema import read_trajectories
from coaflow.stages.synthesize import Config, synthesize
from tests.teachers.openai_server import MODEL, FakeModel, serve


def calc_script(n, seed=0):
    tasks = make_tasks("calc", "train", n, seed=seed)
    return {t.question: {"tool": "python", "args": {"code": f"print({t.metadata['expression']})"},
                         "answer": t.answer} for t in tasks}


@pytest.fixture
def server():
    started = []

    def start(model):
        srv, url = serve(model)
        started.append(srv)
        return url

    yield start
    for s in started:
        s.shutdown()


def llm_cfg(url, n=6, **llm):
    return Config(teacher="llm", suites={"calc": n}, shard_size=2,
                  llm={"base_url": url, "model": MODEL, "api_key_env": None, "backoff_s": 0.01,
                       "timeout_s": 10, **llm})


def test_llm_team_solves_tasks_with_real_tools_and_retries(tmp_path, server):
    model = FakeModel(calc_script(6), fail_every=4, rate_limit_every=7)
    url = server(model)
    # Every 4th and 7th request fails: with 3 conversations in flight one of them can draw several
    # failures in a row, so allow enough retries that none gives up.
    res = synthesize(llm_cfg(url, concurrency=3, max_retries=30), tmp_path / "out", 0,
                     tmp_path / "cache",
                     progress=False)
    trajs = list(read_trajectories(res.outputs["trajectories"]))
    assert len(trajs) == 6 and all(t.outcome.correct for t in trajs)
    assert res.metrics["teacher_retries"] > 0
    t = trajs[0]
    assert [s.agent for s in t.content if hasattr(s, "agent")] == [
        "planner", "coder", "critic", "verifier", "answerer"]
    assert t.provenance.teacher == "llm" and t.provenance.model == MODEL
    # The observation is the sandbox's real output, not anything the server said.
    assert t.content[3].content == t.outcome.final_answer


def test_cache_replays_a_finished_run_without_requests(tmp_path, server):
    model = FakeModel(calc_script(4))
    url = server(model)
    synthesize(llm_cfg(url, n=4), tmp_path / "a", 0, tmp_path / "cache", progress=False)
    before = model.requests
    res = synthesize(llm_cfg(url, n=4), tmp_path / "b", 0, tmp_path / "cache", progress=False)
    assert model.requests == before and res.metrics["teacher_cache_hits"] > 0
    assert res.metrics["trajectories"] == 4


def test_malformed_response_is_a_failed_attempt_not_a_crash(tmp_path, server):
    script = calc_script(4)
    bad = next(iter(script))
    url = server(FakeModel(script, malformed={bad}))
    res = synthesize(llm_cfg(url, n=4), tmp_path / "o", 0, None, progress=False)
    assert res.metrics["trajectories"] == 3 and res.metrics["failed_attempts"] == 1
    assert res.summary["failed_by_reason"] == {"malformed teacher response": 1}


def test_unreachable_endpoint_and_wrong_model_fail_before_any_work(tmp_path, server):
    with pytest.raises(EndpointError, match="cannot reach the teacher endpoint http://127.0.0.1:9"):
        synthesize(llm_cfg("http://127.0.0.1:9/v1"), tmp_path / "o", 0, None, progress=False)
    assert not list((tmp_path / "o" / "trajectories").glob("*"))
    url = server(FakeModel({}))
    cfg = llm_cfg(url)
    cfg.llm.model = "no-such-model"
    with pytest.raises(PipelineError, match="'no-such-model' is not served .*served: teacher-model"):
        synthesize(cfg, tmp_path / "o2", 0, None, progress=False)


@pytest.mark.slow
def test_kill_and_resume_writes_every_task_once(tmp_path, server):
    n = 12
    model = FakeModel(calc_script(n), latency_s=0.15)
    url = server(model)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "coaflow.cli", "synthesize", "--teacher", "llm", "--suite",
           "calc", "-n", str(n), "--output", str(out), "--workdir", str(tmp_path / "w"),
           "--set", f"synthesize.llm.base_url={url}", "--set", f"synthesize.llm.model={MODEL}",
           "--set", "synthesize.llm.concurrency=2", "--set", "synthesize.shard_size=2",
           "--set", "synthesize.llm.api_key_env=null"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "trajectories").glob("*.jsonl"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(read_trajectories(out / "trajectories")))
    assert 0 < written < n, "the kill should land half way"
    requests_before = model.requests
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = [t.task.task_id for t in read_trajectories(out / "trajectories")]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == n
    # Tasks written before the kill were not asked again (6 requests solve one calc task).
    assert model.requests - requests_before <= (n - written) * 6
