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
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from coaflow.models.toolcalls import TOOL_CALL_RE, parse_tool_calls
from coaflow.serving.engine import EngineError
from coaflow.serving.metrics import Metrics

TOOL_OPEN = "<tool_call>"


MAX_STOP, MAX_STOP_CHARS = 4, 256  # OpenAI's limit on stop sequences; a stop string's length
MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413) before it is parsed


class _Strict(BaseModel):
    # strict: "8" is not 8 and "yes" is not true; NaN/Infinity are not numbers
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class Function(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: Function


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Strict):
    """The OpenAI chat request, checked strictly: a bad field is a 400 naming it, never a 500
    (fields coaflow does not use, such as seed or user, are accepted and ignored)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    ignore_eos: bool = False  # vLLM's extra: generate max_tokens tokens (benchmarks)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _int_is_a_number(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has 1 to {MAX_STOP_CHARS} characters")
        return v


def validation_message(err: Any) -> tuple[str, str]:
    """(field, message) of the first error of a ``RequestValidationError`` or pydantic
    ``ValidationError``, without the input value (it may be NaN, which JSON cannot carry)."""
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "(body)"
    return field, f"{field}: {first.get('msg', 'invalid')}"


def _text(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; the model reads text."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def to_messages(req: ChatRequest, system_prompt: str | None) -> list[dict]:
    messages = []
    for msg in req.messages:
        m = msg.model_dump(exclude_none=True)
        m["content"] = _text(m.get("content"))
        messages.append(m)
    if system_prompt and not any(m.get("role") in ("system", "developer") for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def request_tools(req: ChatRequest) -> list[dict] | None:
    """The request's tool schemas as the chat template renders them (as training did)."""
    if req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools or []]


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


class BodyLimit:
    """Refuse (413) a request whose body is past ``limit`` bytes before it is read or parsed: a
    5 MB message must not stall every other request while it is decoded and tokenized. Plain
    ASGI: Starlette's ``BaseHTTPMiddleware`` would hide a client's disconnect from the handler."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope.get("headers") or []).get(b"content-length", b"")
            if size.isdigit() and int(size) > self.limit:
                response = JSONResponse({"error": {
                    "message": f"request body of {int(size):,} bytes exceeds the server's limit "
                               f"of {self.limit:,} bytes", "type": "invalid_request_error",
                    "code": 413}}, status_code=413)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _drain(s) -> str:
    """Wait for one generated sequence to end; its finish reason (or "error")."""
    while True:
        event = await s.events.get()
        if event[0] in ("done", "error"):
            return "error" if event[0] == "error" else event[1]


async def _watch(request: Request, seqs) -> None:
    """Cancel the generation of ``seqs`` when their client goes away. A task of its own: a
    streaming response whose send failed no longer runs its generator's code, and tokens
    arriving every millisecond must not starve the check."""
    while any(s.finished is None for s in seqs):
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            for s in seqs:
                s.cancel()
            return


async def _choices(seqs, tools_given: bool) -> list[dict] | str:
    """The ``choices`` of a finished (non-streamed) completion, or "cancelled"/"error"."""
    choices = []
    for i, s in enumerate(seqs):
        reason = await _drain(s)
        if reason in ("cancelled", "error"):
            return reason
        content, calls = split_tool_calls(s.text, tools_given)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": i, "message": message, "logprobs": None,
                        "finish_reason": "tool_calls" if calls else reason})
    return choices


def create_app(engine, model_name: str, system_prompt: str | None = None,
               max_tokens_default: int = 512, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="coaflow serving", version="1")
    metrics = Metrics(engine)
    watchers: set[asyncio.Task] = set()
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                            status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        field, message = validation_message(exc)
        metrics.request("chat", 400, 0)
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                       "param": field, "code": 400}}, status_code=400)

    app.add_middleware(BodyLimit, limit=max_body_bytes)

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
        tools = request_tools(req)
        try:  # rendering and tokenizing a long prompt is CPU work: off the event loop
            ids = await asyncio.to_thread(engine.prompt_ids, to_messages(req, system_prompt),
                                          tools)
            stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_default
            seqs = engine.submit(ids, req.n, max_tokens, engine.sampling(req.temperature,
                                                                          req.top_p), stops,
                                 asyncio.get_running_loop(), ignore_eos=req.ignore_eos)
        except Exception as e:  # noqa: BLE001 - bad messages, a template error, too long: 400
            metrics.request("chat", 400, time.perf_counter() - start)
            return error(400, f"{type(e).__name__}: {e}" if not isinstance(e, EngineError)
                         else str(e))
        watcher = asyncio.create_task(_watch(request, seqs))
        watchers.add(watcher)  # held until done: the loop keeps only weak references to tasks
        watcher.add_done_callback(watchers.discard)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return StreamingResponse(_stream(rid, seqs, len(ids), bool(tools), start),
                                     media_type="text/event-stream")
        try:
            choices = await _choices(seqs, bool(tools))
        finally:
            for s in seqs:
                s.cancel()  # a no-op for finished rows; stops the rest if the handler ends
        if choices == "cancelled":  # the client is gone: nobody reads an answer
            metrics.request("chat", 499, time.perf_counter() - start)
            return error(499, "client closed the request")
        if choices == "error":
            metrics.request("chat", 500, time.perf_counter() - start)
            return error(500, "generation failed", "server_error")
        completion = sum(len(s.ids) for s in seqs)
        metrics.request("chat", 200, time.perf_counter() - start, len(ids), completion)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

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
        try:
            async for event in _events(seqs, tools_given, chunk):
                if event is None:
                    status = 500
                    continue
                yield event
        finally:  # the client went away (the generator is closed): stop generating for it
            for s in seqs:
                s.cancel()
        yield "data: [DONE]\n\n"
        metrics.request("chat", status, time.perf_counter() - start, prompt_tokens,
                        sum(len(s.ids) for s in seqs))

    async def _events(seqs, tools_given: bool, chunk):
        """The chunks of every choice in turn; None marks a generation error."""
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
                    yield None
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

