"""A real HTTP server speaking the OpenAI chat API, with a rule-based "model" behind it.

It lets the LLM teacher's client be tested for real (HTTP, JSON, retries, timeouts, concurrency)
without a GPU: the model answers each role's prompt from a script keyed by the question. Faults are
injected on request: 429s, 500s, latency, malformed tool calls.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "teacher-model"


class FakeModel:
    def __init__(self, script: dict[str, dict], latency_s: float = 0.0, fail_every: int = 0,
                 rate_limit_every: int = 0, malformed: set[str] = frozenset()):
        """script: question -> {"tool": name, "args": {...}, "answer": str}."""
        self.script, self.latency_s = script, latency_s
        self.fail_every, self.rate_limit_every, self.malformed = fail_every, rate_limit_every, \
            malformed
        self.requests = 0
        self.lock = threading.Lock()

    def respond(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
            n = self.requests
        if self.latency_s:
            time.sleep(self.latency_s)
        if body.get("model") != MODEL:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}}
        if self.rate_limit_every and n % self.rate_limit_every == 0:
            return 429, {"error": {"message": "rate limited"}}
        if self.fail_every and n % self.fail_every == 0:
            return 500, {"error": {"message": "overloaded"}}
        msgs = body["messages"]
        system = msgs[0]["content"]
        question = next((q for q in self.script if q in msgs[1]["content"]), None)
        plan = self.script.get(question, {})
        if "planner" in system:
            return 200, _reply("1. Use the tool. 2. Read the result. 3. Answer.")
        if "critic" in system:
            return 200, _reply("The result looks consistent with the question.")
        if "verifier" in system:
            return 200, _reply("VERIFIED")
        if "answerer" in system:
            return 200, _reply(plan.get("answer", "unknown"))
        # the tool agent: one tool call, then the answer
        if any(m["role"] == "tool" for m in msgs):
            return 200, _reply(f"ANSWER: {plan.get('answer', 'unknown')}")
        args = "{not json" if question in self.malformed else json.dumps(plan.get("args", {}))
        return 200, _reply("Let me use the tool.", [{
            "id": f"call_{n}", "type": "function",
            "function": {"name": plan.get("tool", "python"), "arguments": args}}])


def _reply(content: str, tool_calls: list | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if tool_calls else "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}}


def serve(model: FakeModel) -> tuple[ThreadingHTTPServer, str]:
    """Start the server on a free port of 127.0.0.1; returns (server, base_url)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client was killed mid-request (the resume test does that)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "not found"}})
            self._send(*model.respond(body))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"
