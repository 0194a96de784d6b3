"""Both backends for real: a tiny transformers model batched across episodes, and an HTTP server
speaking the OpenAI chat API (with injected failures)."""

import json
import threading

import pytest

from coaflow.agent import OpenAIBackend, TransformersBackend, run_episodes
from coaflow.agent.models import make_backend, resolve_model
from coaflow.agent.openai import EndpointError, EndpointUnreachable
from coaflow.envs import make_tasks
from coaflow.errors import PipelineError
from tests.teachers.openai_server import serve


def test_batched_generation_equals_one_at_a_time(tiny_dir):
    """Left padding and the batch change nothing under greedy decoding: the same trajectories."""
    tasks = make_tasks("kbqa", "test", 3, seed=0) + make_tasks("calc", "test", 3, seed=0)
    kw = dict(max_turns=2, max_new_tokens=24)
    batched = run_episodes(TransformersBackend(str(tiny_dir), batch_size=6), tasks, **kw)
    single = run_episodes(TransformersBackend(str(tiny_dir), batch_size=1), tasks, **kw)
    dump = [[s.model_dump() for s in t.content] for t in batched]
    assert dump == [[s.model_dump() for s in t.content] for t in single]
    assert all(0 < t.details["tokens"] <= 48 and t.details["turns"] >= 1 for t in batched)


def test_a_reused_kv_cache_gives_what_a_fresh_prompt_gives(tiny_dir):
    """Turn 2 of three episodes of different lengths, batched: computed from each episode's cached
    turn 1 (only the new tokens run) it yields exactly the tokens a full re-encoding yields."""
    tasks = make_tasks("kbqa", "test", 2, seed=0) + make_tasks("calc", "test", 1, seed=0)
    first = [[{"role": "user", "content": t.question}] for t in tasks]
    keys = [t.task_id for t in tasks]
    cached = TransformersBackend(str(tiny_dir), batch_size=3)
    turn1 = cached.generate(first, max_new_tokens=12, keys=keys)
    second = [m + [{"role": "assistant", "content": c.text},
                   {"role": "user", "content": "Result: " + "x" * (7 * i)}]
              for i, (m, c) in enumerate(zip(first, turn1, strict=True))]
    reused = cached.generate(second, max_new_tokens=12, keys=keys)
    assert cached.stats["reused_tokens"] > 0
    # what the cache holds for each episode (built from padded batches, twice) is what one
    # forward pass over the episode's tokens computes
    import torch

    for tokens, kv in cached.past.values():
        with torch.no_grad():
            out = cached.model(input_ids=torch.tensor([tokens]), use_cache=True)
        for layer, (k, v) in zip(out.past_key_values.layers, kv, strict=True):
            assert torch.allclose(layer.keys[0], k, atol=1e-4)
            assert torch.allclose(layer.values[0], v, atol=1e-4)
    fresh = TransformersBackend(str(tiny_dir), batch_size=3).generate(second, max_new_tokens=12)
    assert [c.text for c in reused] == [c.text for c in fresh]
    cached.generate(second[:1], max_new_tokens=4, keys=keys[:1])
    assert list(cached.past) == keys[:1]  # the finished episodes dropped their cache


def test_a_shared_prefix_gives_what_each_prompt_alone_gives(tiny_dir, monkeypatch):
    """New episodes of a suite share the system prompt and tool schemas: run once, every one of
    them starts from its keys and values, and the episodes come out token for token the same."""
    from coaflow.agent import hf

    tasks = make_tasks("kbqa", "test", 3, seed=0) + make_tasks("calc", "test", 3, seed=0)
    kw = dict(max_turns=2, max_new_tokens=16)
    shared = TransformersBackend(str(tiny_dir), batch_size=6)
    with_prefix = run_episodes(shared, tasks, **kw)
    monkeypatch.setattr(hf, "SHARED_PREFIX", 10**6)  # no prefix is worth sharing
    alone = TransformersBackend(str(tiny_dir), batch_size=6)
    without = run_episodes(alone, tasks, **kw)
    dump = [[s.model_dump() for s in t.content] for t in with_prefix]
    assert dump == [[s.model_dump() for s in t.content] for t in without]
    # two suites, two prefixes run once each: the rows of a suite reused the same tokens
    assert shared.stats["reused_tokens"] - alone.stats["reused_tokens"] > 4 * 200


def test_each_row_stops_at_its_own_budget_or_when_it_loops(tiny_dir, monkeypatch):
    from coaflow.agent import hf

    backend = TransformersBackend(str(tiny_dir), batch_size=4)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 6 times 7?", "Hello there")]
    monkeypatch.setattr(backend, "stop_ids", [10**9])  # no row ends its turn by itself
    short, long = backend.generate(prompts, max_new_tokens=[3, 20])
    assert (short.tokens, short.finish, long.tokens, long.finish) == (3, "length", 20, "length")
    monkeypatch.setattr(hf, "repeats", lambda text: True)  # every row loops, seen at token 16
    looped = backend.generate(prompts, max_new_tokens=[12, 40])
    assert [(c.tokens, c.finish) for c in looped] == [(12, "length"), (16, "repetition")]


def test_context_limit_ends_the_episode_without_generating(tiny_dir):
    backend = TransformersBackend(str(tiny_dir), max_context=64)
    [t] = run_episodes(backend, make_tasks("calc", "test", 1), max_turns=3, max_new_tokens=32)
    assert t.details["stop"] == "context" and t.details["tokens"] == 0


def test_threads_apply_while_generating_only(tiny_dir, monkeypatch):
    import torch

    seen = []
    backend = TransformersBackend(str(tiny_dir), threads=1)
    monkeypatch.setattr(backend, "_generate", lambda *a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backend.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=4)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_bad_models_are_one_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="no such model folder"):
        TransformersBackend(str(tmp_path / "nope"))
    (tmp_path / "m").mkdir()
    with pytest.raises(PipelineError, match="not a Hugging Face model folder"):
        make_backend(str(tmp_path / "m"))
    assert resolve_model("http://h:1/v1") == "http://h:1/v1"


class Solver:
    """An OpenAI-compatible "model": one structured python call, then the answer; every
    ``fail_every``-th request is a 500."""

    def __init__(self, tasks, fail_every=0):
        self.exprs = {t.question: t.metadata["expression"] for t in tasks}
        self.fail_every, self.requests, self.bodies = fail_every, 0, []
        self.lock = threading.Lock()

    def respond(self, body):
        with self.lock:
            self.requests += 1
            n = self.requests
            self.bodies.append(body)
        if self.fail_every and n % self.fail_every == 0:
            return 500, {"error": {"message": "overloaded"}}
        msgs = body["messages"]
        tool = [m for m in msgs if m["role"] == "tool"]
        if tool:
            message = {"role": "assistant", "content": f"<answer>{tool[-1]['content']}</answer>"}
        else:
            q = next(m["content"] for m in msgs if m["role"] == "user")
            message = {"role": "assistant", "content": "<plan>run it</plan>", "tool_calls": [{
                "id": "x", "type": "function", "function": {
                    "name": "python", "arguments": json.dumps(
                        {"code": f"print({self.exprs[q]})"})}}]}
        return 200, {"choices": [{"message": message, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 7}}


def test_openai_backend_solves_with_retries_and_concurrency():
    tasks = make_tasks("calc", "test", 8, seed=1)
    solver = Solver(tasks, fail_every=5)
    srv, url = serve(solver)
    try:
        backend = OpenAIBackend(url, concurrency=4, backoff_s=0.01)  # model: the served one
        trajs = run_episodes(backend, tasks, max_turns=4, max_new_tokens=64)
    finally:
        srv.shutdown()
    assert [t.outcome.correct for t in trajs] == [True] * 8
    assert all(t.details["tokens"] == 14 and t.details["tool_calls"] == 1 for t in trajs)
    assert backend.client.usage["retries"] > 0
    assert solver.bodies[0]["model"] == "teacher-model" and solver.bodies[0]["max_tokens"] == 64
    assert [t["function"]["name"] for t in solver.bodies[0]["tools"]] == ["python"]  # as trained
    # the tool result goes back as an OpenAI tool message answering the call's id
    second = next(b for b in solver.bodies if any(m["role"] == "tool" for m in b["messages"]))
    assert second["messages"][-1]["tool_call_id"] == second["messages"][-2]["tool_calls"][0]["id"]


def test_openai_backend_errors():
    with pytest.raises(EndpointUnreachable, match="cannot reach the model endpoint"):
        OpenAIBackend("http://127.0.0.1:9/v1")
    srv, url = serve(Solver([]))
    try:
        with pytest.raises(EndpointError, match="'other' is not served"):
            OpenAIBackend(url, "other")
    finally:
        srv.shutdown()


def test_openai_backend_gives_up_with_one_clear_error():
    tasks = make_tasks("calc", "test", 2, seed=1)
    srv, url = serve(Solver(tasks, fail_every=1))
    try:
        backend = OpenAIBackend(url, max_retries=1, backoff_s=0.01)
        with pytest.raises(EndpointError, match="gave up after 2 attempts: HTTP 500"):
            run_episodes(backend, tasks, max_turns=2, max_new_tokens=16)
    finally:
        srv.shutdown()
