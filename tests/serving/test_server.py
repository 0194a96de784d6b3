"""``coaflow serve`` answers the official ``openai`` client: plain chat, tool calls (from the
model's ``<tool_call>`` blocks), streaming, n/stop/max_tokens, 8 concurrent clients batched,
``/v1/models``, ``/health``, ``/metrics``; and clear errors for bad requests."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from tests import requires
from tests.serving.serve_fixtures import QUESTION, kbqa_tools

openai = requires.module("openai")
pytestmark = pytest.mark.slow  # a real server process per module (~1 min to start on 2 busy cores)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def ask(**kw):
    return dict(model="tiny", messages=[{"role": "user", "content": QUESTION}], **kw)


def test_tool_calls_with_the_trained_system_prompt(server):
    r = client(server).chat.completions.create(**ask(tools=kbqa_tools(), temperature=0))
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "search"
    assert json.loads(call.function.arguments) == {"query": "Varn Labs"}
    assert r.usage.completion_tokens > 5 and r.usage.prompt_tokens > 50


def test_plain_chat_stream_matches_and_stop_cuts(server):
    c = client(server)
    full = c.chat.completions.create(**ask(tools=kbqa_tools(), max_tokens=64))
    assert full.choices[0].message.tool_calls  # the model's own default: greedy
    plain = c.chat.completions.create(**ask(max_tokens=12))  # no tools: text, no parsing
    assert isinstance(plain.choices[0].message.content, str)
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 12

    chunks = list(c.chat.completions.create(**ask(max_tokens=12), stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    stream = list(c.chat.completions.create(**ask(tools=kbqa_tools()), stream=True))
    calls = [tc for ch in stream for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["search"]
    assert stream[-1].choices[0].finish_reason == "tool_calls"

    cut = c.chat.completions.create(**ask(tools=kbqa_tools(), stop=['"arguments"'], n=2))
    assert len(cut.choices) == 2
    for ch in cut.choices:
        assert ch.finish_reason == "stop" and not ch.message.tool_calls
        assert ch.message.content.endswith('"search", ')


def test_tool_choice_is_honoured_and_logprobs_returned(server):
    """A named function or "required": the reply starts with the call (the model writes the
    arguments); logprobs come back through the openai client's own types."""
    c = client(server)
    named = c.chat.completions.create(**ask(tools=kbqa_tools(), tool_choice={
        "type": "function", "function": {"name": "search"}}, temperature=0, logprobs=True,
        top_logprobs=2))
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "search"
    assert json.loads(call.function.arguments) == {"query": "Varn Labs"}
    items = named.choices[0].logprobs.content
    assert len(items) == named.usage.completion_tokens and len(items[0].top_logprobs) == 2
    required = c.chat.completions.create(**ask(tools=kbqa_tools(), tool_choice="required"))
    assert required.choices[0].message.tool_calls[0].function.name == "search"
    with pytest.raises(openai.BadRequestError, match="tool_choice: no tool named 'open'"):
        c.chat.completions.create(**ask(tools=kbqa_tools(), tool_choice={
            "type": "function", "function": {"name": "open"}}))


def test_eight_concurrent_clients_are_batched(server):
    async def one(c, i):
        return await c.chat.completions.create(**ask(tools=kbqa_tools(), max_tokens=40 + i))

    async def many():
        c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(c, i) for i in range(8)))

    steps, rows = (_metric(server, "coaflow_decode_steps_total"),
                   _metric(server, "coaflow_decode_rows_total"))
    replies = asyncio.run(many())
    assert all(r.choices[0].message.tool_calls[0].function.name == "search" for r in replies)
    mean_batch = (_metric(server, "coaflow_decode_rows_total") - rows) / (
        _metric(server, "coaflow_decode_steps_total") - steps)
    assert mean_batch > 2  # 8 requests decoded together, not one after another


def _metric(url, name) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_models_health_metrics_and_errors(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(**ask(max_tokens=100000))
    with pytest.raises(openai.BadRequestError, match="messages"):  # 400 naming the field,
        c.chat.completions.create(model="tiny", messages=[])  # as OpenAI answers
    text = httpx.get(f"{server}/metrics").text
    assert 'coaflow_requests_total{endpoint="chat",status="404"}' in text
    assert _metric(server, "coaflow_completion_tokens_total") > 0
    assert "coaflow_request_seconds_bucket" in text


def test_a_taken_port_is_one_clear_error():
    from coaflow.errors import UserError
    from coaflow.serving.server import bind

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(UserError, match=f"port {held.getsockname()[1]} .* in use"):
            bind("127.0.0.1", held.getsockname()[1])
    first = bind("127.0.0.1", 0, reuse_port=True)
    second = bind("127.0.0.1", first.getsockname()[1], reuse_port=True)  # a replacement server
    first.close(), second.close()


def test_vllm_template_adds_the_system_prompt(tool_model):
    from transformers import AutoTokenizer

    from coaflow.serving.server import chat_template_with_system, vllm_argv

    tok = AutoTokenizer.from_pretrained(tool_model)
    template = chat_template_with_system(tok.chat_template, "Be brief.")
    bare = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template,
                                   tokenize=False)
    own = tok.apply_chat_template([{"role": "system", "content": "Mine."},
                                   {"role": "user", "content": "hi"}], chat_template=template,
                                  tokenize=False)
    assert bare.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Mine." in own and "Be brief." not in own
    argv = vllm_argv("/m", "tiny", "0.0.0.0", 8000, "/t.jinja")
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
