"""The OpenAI-compatible HTTP API over an engine: what the ``openai`` client and any agent
framework speak.

    POST /v1/chat/completions   messages (+ tools): the model's <tool_call> blocks come back as
                                ``tool_calls``; stream=true sends server-sent events; n (at most
                                the server's --max-n, 16 by default), max_tokens, temperature,
                                top_p, stop, seed, logprobs/top_logprobs, tool_choice
    GET  /v1/models             the one model served
    GET  /health                200 once the model is loaded
    GET  /metrics               Prometheus text: requests, latency, tokens, decode steps

What is checked and what is refused: ``schema``. When the client sends no system message, the
system prompt the model was trained with (recorded in the model folder's ``coaflow_model.json``
at registration) is put first, as in training.

A prompt is rendered and tokenized off the event loop, at most ``TOKENIZE_AT_ONCE`` at a time
(each may be megabytes), only while its client is still there, and refused by its length in
characters before it is tokenized when it cannot fit the model's context.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from coaflow.schema.markup import TOOL_CALL_RE, parse_tool_calls
from coaflow.serving.engine import EngineError
from coaflow.serving.metrics import Metrics
from coaflow.serving.schema import (  # noqa: F401 - ChatRequest and to_messages are this API's
    TOOL_OPEN,
    ChatRequest,
    check,
    forced_start,
    request_tools,
    to_messages,
    validation_message,
)

MAX_BODY_BYTES = 4 << 20  # a request body larger than this is refused (413) before it is parsed
TOKENIZE_AT_ONCE = 2  # prompts rendered and tokenized at the same time (CPU and memory bound)


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


async def _drain(s) -> tuple[str, str]:
    """Wait for one generated sequence to end: ("done", finish reason) or ("error", message)."""
    while True:
        event = await s.events.get()
        if event[0] in ("done", "error"):
            return event[0], event[1]


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


def create_app(engine, model_name: str, system_prompt: str | None = None,
               max_tokens_default: int = 512, max_body_bytes: int = MAX_BODY_BYTES,
               max_n: int = 16) -> FastAPI:
    app = FastAPI(title="coaflow serving", version="1")
    metrics = Metrics(engine)
    watchers: set[asyncio.Task] = set()
    created = int(time.time())
    tokenizing = asyncio.Semaphore(TOKENIZE_AT_ONCE)

    def error(status: int, message: str, kind: str = "invalid_request_error",
              param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                       "code": status}}, status_code=status)

    def logprob_items(entries) -> list[dict]:
        """OpenAI's ``logprobs.content`` items for (token id, logprob, top alternatives)."""
        def one(tid: int, lp: float) -> dict:
            text = engine.tokenizer.decode([tid])
            return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode())}

        return [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
                for t, lp, top in entries]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        field, message = validation_message(exc)
        metrics.request("chat", 400, 0)
        return error(400, message, param=field)

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
                         "not_found_error", "model")
        bad = check(req, max_n)
        if bad:
            metrics.request("chat", 400, 0)
            return error(400, bad[1], param=bad[0])
        tools, forced = request_tools(req), forced_start(req)
        max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_default
        try:
            async with tokenizing:  # a few prompts at a time, and only for clients still there
                if await request.is_disconnected():
                    metrics.request("chat", 499, time.perf_counter() - start)
                    return error(499, "client closed the request")
                ids = await asyncio.to_thread(engine.prompt_ids, to_messages(req, system_prompt),
                                              tools, max_tokens, forced)
            stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            seqs = engine.submit(ids, req.n, max_tokens, engine.sampling(req.temperature,
                                                                          req.top_p), stops,
                                 asyncio.get_running_loop(), ignore_eos=req.ignore_eos,
                                 logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                 seed=req.seed, forced=forced)
        except EngineError as e:
            status = 503 if e.field == "(server)" else 400
            metrics.request("chat", status, time.perf_counter() - start)
            return error(status, str(e), param=e.field)
        except Exception as e:  # noqa: BLE001 - bad messages, a template error: 400
            metrics.request("chat", 400, time.perf_counter() - start)
            return error(400, f"messages: {type(e).__name__}: {e}", param="messages")
        watcher = asyncio.create_task(_watch(request, seqs))
        watchers.add(watcher)  # held until done: the loop keeps only weak references to tasks
        watcher.add_done_callback(watchers.discard)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        usage = req.stream_options.include_usage if req.stream_options else False
        if req.stream:
            return StreamingResponse(_stream(rid, seqs, len(ids), bool(tools), start, usage,
                                             req.parallel_tool_calls),
                                     media_type="text/event-stream")
        try:
            choices = []
            for i, s in enumerate(seqs):
                kind, value = await _drain(s)
                if kind == "error" or value == "cancelled":
                    break
                content, calls = split_tool_calls(s.text, bool(tools))
                calls = calls if req.parallel_tool_calls else calls[:1]
                message = {"role": "assistant", "content": content}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "finish_reason":
                                "tool_calls" if calls else value, "logprobs":
                                {"content": logprob_items(s.token_logprobs)}
                                if s.logprobs is not None else None})
        finally:
            for s in seqs:
                s.cancel()  # a no-op for finished rows; stops the rest if the handler ends
        if value == "cancelled":  # the client is gone: nobody reads an answer
            metrics.request("chat", 499, time.perf_counter() - start)
            return error(499, "client closed the request")
        if kind == "error":
            status = 503 if "shutting down" in value else 500
            metrics.request("chat", status, time.perf_counter() - start)
            return error(status, f"generation failed: {value}", "server_error")
        completion = sum(len(s.ids) for s in seqs)
        metrics.request("chat", 200, time.perf_counter() - start, len(ids), completion)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                          "total_tokens": len(ids) + completion}}

    async def _stream(rid: str, seqs, prompt_tokens: int, tools_given: bool, start: float,
                      usage: bool, parallel: bool):
        """Server-sent events: a role chunk, text deltas as they are generated (text from the
        first ``<tool_call>`` on is held until the turn ends and sent as ``tool_calls``), a
        finish chunk per choice, a usage chunk when asked, then ``[DONE]``."""

        def chunk(i: int, delta: dict, finish: str | None = None, lp=None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": i, "delta": delta,
                                                      "logprobs": lp, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        status = 200
        try:
            async for event in _events(seqs, tools_given, chunk, parallel):
                if event is None:
                    status = 500
                    continue
                yield event
        finally:  # the client went away (the generator is closed): stop generating for it
            for s in seqs:
                s.cancel()
        completion = sum(len(s.ids) for s in seqs)
        if usage:
            body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [], "usage": {
                        "prompt_tokens": prompt_tokens, "completion_tokens": completion,
                        "total_tokens": prompt_tokens + completion}}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        metrics.request("chat", status, time.perf_counter() - start, prompt_tokens, completion)

    async def _events(seqs, tools_given: bool, chunk, parallel: bool):
        """The chunks of every choice in turn; None marks a generation error."""
        for i, s in enumerate(seqs):
            yield chunk(i, {"role": "assistant", "content": ""})
            got, sent, lp_sent = "", 0, 0  # text so far; characters and logprobs streamed

            def logprobs(upto: int, s=s):
                nonlocal lp_sent
                if s.logprobs is None:
                    return None
                items, lp_sent = logprob_items(s.token_logprobs[lp_sent:upto]), upto
                return {"content": items}

            while True:
                kind, value, *count = await s.events.get()
                if kind == "text":
                    got += value
                    visible = got
                    if tools_given:
                        cut = got.find(TOOL_OPEN)
                        visible = got[:cut] if cut >= 0 else _without_partial_tag(got)
                    if len(visible) > sent:
                        yield chunk(i, {"content": visible[sent:]}, lp=logprobs(count[0]))
                        sent = len(visible)
                    continue
                if kind == "error":
                    yield None
                    yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                    break
                content, calls = split_tool_calls(got, tools_given)
                calls = calls if parallel else calls[:1]
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
                yield chunk(i, {}, "tool_calls" if calls else value,
                            lp=logprobs(len(s.token_logprobs)))
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
