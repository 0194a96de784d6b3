"""The OpenAI-compatible HTTP API over an engine: what the ``openai`` client and any agent
framework speak.

    POST /v1/chat/completions   messages (+ tools): the model's <tool_call> blocks come back as
                                ``tool_calls``; stream=true sends server-sent events; n, max_tokens,
                                temperature, top_p, stop
    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded
    GET  /metrics               Prometheus text: requests, latency, tokens, batches

When the client sends no system message, the system prompt the model was trained with (recorded
in the model folder's ``coaflow_model.json`` at registration) is put first, as in training.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from coaflow.models.toolcalls import TOOL_CALL_RE, parse_tool_calls
from coaflow.serving.engine import EngineError
from coaflow.serving.metrics import Metrics

TOOL_OPEN = "<tool_call>"


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # seed, user, logprobs...: accepted, not used

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None


def _text(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; the model reads text."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def to_messages(req: ChatRequest, system_prompt: str | None) -> list[dict]:
    messages = []
    for m in req.messages:
        m = dict(m)
        m["content"] = _text(m.get("content"))
        messages.append(m)
    if system_prompt and not any(m.get("role") in ("system", "developer") for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def split_tool_calls(text: str, tools_given: bool) -> tuple[str | None, list[dict]]:
    """The reply's text without its ``<tool_call>`` blocks, and those blocks as OpenAI
    ``tool_calls`` (a block that does not parse stays in the text: the client sees what the
    model said).

    >>> split_tool_calls('ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', True)[1][0]["function"]
    {'name': 'f', 'arguments': '{"a": 1}'}
    """
    if not tools_given or TOOL_OPEN not in text:
        return text, []
    calls, kept = [], text
    for block in TOOL_CALL_RE.finditer(text):
        parsed = parse_tool_calls(block.group(0))
        if parsed and "error" not in parsed[0]:
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": parsed[0]["name"], "arguments": json.dumps(
                              parsed[0]["arguments"], ensure_ascii=False)}})
            kept = kept.replace(block.group(0), "", 1)
    kept = re.sub(r"\n{3,}", "\n\n", kept).strip()
    return (kept or None) if calls else text, calls


def create_app(engine, model_name: str, system_prompt: str | None = None,
               max_tokens_default: int = 512) -> FastAPI:
    app = FastAPI(title="coaflow serving", version="1")
    metrics = Metrics(engine)
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                            status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_name, "pid": os.getpid()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "coaflow"}]}

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        start = time.perf_counter()
        if req.model != model_name:
            metrics.request("chat", 404, 0)
            return error(404, f"The model `{req.model}` does not exist (serving: {model_name})",
                         "not_found_error")
        tools = req.tools if req.tool_choice != "none" else None
        try:
            ids = engine.prompt_ids(to_messages(req, system_prompt), tools)
            stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_default
            seqs = engine.submit(ids, req.n, max_tokens, engine.sampling(req.temperature,
                                                                          req.top_p), stops,
                                 asyncio.get_running_loop())
        except (EngineError, ValueError, TypeError) as e:  # bad messages, too long
            metrics.request("chat", 400, time.perf_counter() - start)
            return error(400, str(e))
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(rid, seqs, len(ids), bool(tools), start),
                                     media_type="text/event-stream")
        choices = []
        for i, s in enumerate(seqs):
            reason = await _drain(s)
            if reason == "error":
                metrics.request("chat", 500, time.perf_counter() - start)
                return error(500, "generation failed", "server_error")
            content, calls = split_tool_calls(s.text, bool(tools))
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "logprobs": None,
                            "finish_reason": "tool_calls" if calls else reason})
        completion = sum(len(s.ids) for s in seqs)
        metrics.request("chat", 200, time.perf_counter() - start, len(ids), completion)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

    async def _drain(s) -> str:
        while True:
            event = await s.events.get()
            if event[0] in ("done", "error"):
                return "error" if event[0] == "error" else event[1]

    async def _stream(rid: str, seqs, prompt_tokens: int, tools_given: bool, start: float):
        """Server-sent events: a role chunk, text deltas as they are generated (text from the
        first ``<tool_call>`` on is held until the turn ends and sent as ``tool_calls``), a
        finish chunk per choice, then ``[DONE]``."""

        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": i, "delta": delta,
                                                      "logprobs": None, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        status = 200
        for i, s in enumerate(seqs):
            yield chunk(i, {"role": "assistant", "content": ""})
            got, sent = "", 0  # text generated so far; characters of it streamed as content
            while True:
                kind, value = await s.events.get()
                if kind == "text":
                    got += value
                    visible = got
                    if tools_given:
                        cut = got.find(TOOL_OPEN)
                        visible = got[:cut] if cut >= 0 else _without_partial_tag(got)
                    if len(visible) > sent:
                        yield chunk(i, {"content": visible[sent:]})
                        sent = len(visible)
                    continue
                if kind == "error":
                    status = 500
                    yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                    break
                content, calls = split_tool_calls(got, tools_given)
                if calls:
                    streamed = got[:sent].strip()
                    rest = (content or "")[len(streamed):] if (content or "").startswith(
                        streamed) else ""
                else:
                    rest = got[sent:]
                if rest:
                    yield chunk(i, {"content": rest})
                if calls:
                    yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                yield chunk(i, {}, "tool_calls" if calls else value)
                break
        yield "data: [DONE]\n\n"
        metrics.request("chat", status, time.perf_counter() - start, prompt_tokens,
                        sum(len(s.ids) for s in seqs))

    return app


def _without_partial_tag(text: str) -> str:
    """Text minus a tail that may be the start of ``<tool_call>``.

    >>> _without_partial_tag("hello <tool_"), _without_partial_tag("a < b")
    ('hello ', 'a < b')
    """
    for k in range(len(TOOL_OPEN) - 1, 0, -1):
        if text.endswith(TOOL_OPEN[:k]):
            return text[:-k]
    return text

