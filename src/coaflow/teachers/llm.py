"""The LLM teacher: the same team (planner, tool agent, critic, verifier, answerer), each role a
prompt to any OpenAI-compatible chat endpoint, tools executed against the real environment.

The client is built for long unattended runs: async with a concurrency limit, a per-request
timeout, retries with exponential backoff on 429 / 5xx / timeouts / dropped connections (honouring
``Retry-After``), and an on-disk cache of responses keyed by the request, so a rerun after a crash
replays finished conversations for free. ``check_endpoint`` runs before any work: an unreachable URL,
a rejected key or a model the server does not serve is one clear error.

A response that cannot be used (no choices, a tool call with arguments that are not JSON, a tool
the suite does not have) raises ``MalformedResponse``; the stage records it as a failed attempt with
its reason and goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field

from coaflow.config import Section
from coaflow.errors import PipelineError, ServiceUnavailable
from coaflow.schema import Task
from coaflow.schema.convert import parse_tool_call
from coaflow.teachers.log import TeamLog

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}

PROMPTS = {
    "planner": "You are the planner of a team of agents. Break the user's question into short "
               "numbered steps the team can carry out with its tools. Do not answer it.",
    "actor": "You are the tool agent of a team. Carry out the plan with the tools, one call at a "
             "time, reading each result. When you know the answer, reply 'ANSWER: <answer>' "
             "without calling a tool.",
    "critic": "You are the critic of a team of agents. In one or two sentences, say what the last "
              "tool result shows and whether anything went wrong.",
    "verifier": "You are the verifier of a team of agents. Check the proposed answer against the "
                "evidence. Reply 'VERIFIED' if it is supported, or 'REJECTED: <reason>'.",
    "answerer": "You are the answerer of a team of agents. Reply with the final answer only, as "
                "short as possible: a name, a number or a date.",
}
ACTOR_NAME = {"kbqa": "searcher", "calc": "coder"}


class LlmTeacherConfig(Section):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible endpoint")
    model: str = Field("Qwen/Qwen3-32B", description="model name the endpoint serves")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var holding the API key "
                                    "(the key itself never goes in a config)")
    concurrency: int = Field(16, ge=1, description="conversations in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout")
    max_retries: int = Field(5, ge=0, description="retries on 429/5xx/timeouts before giving up")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    temperature: float = Field(0.3, ge=0)
    max_tokens: int = Field(1024, ge=1, description="completion tokens per call")
    max_turns: int = Field(8, ge=1, description="tool calls per task before giving up")
    cache: bool = Field(True, description="cache responses on disk under <workdir>/cache/llm")


class TeacherError(PipelineError):
    """The endpoint cannot be used at all (unreachable, key rejected, model not served)."""


class TeacherUnreachable(ServiceUnavailable, TeacherError):
    """The endpoint did not answer or answered 5xx: retryable (exit code 75)."""


class MalformedResponse(ValueError):
    """One response could not be used; the task is recorded as a failed attempt."""


class ChatClient:
    def __init__(self, cfg: LlmTeacherConfig, cache_dir: Path | None):
        self.cfg, self.cache_dir = cfg, cache_dir
        key = os.environ.get(cfg.api_key_env or "", "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = cfg.base_url.rstrip("/")
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cache_hits": 0,
                      "retries": 0}
        self._client: httpx.AsyncClient | None = None

    def check_endpoint(self) -> None:
        """Fail fast, before any work, if the endpoint or the model cannot be used."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self.headers, timeout=self.cfg.timeout_s)
        except httpx.HTTPError as e:
            raise TeacherUnreachable(f"cannot reach the teacher endpoint {self.url}: "
                               f"{type(e).__name__}: {e}") from None
        if r.status_code in (401, 403):
            raise TeacherError(f"{self.url} rejected the API key (HTTP {r.status_code}); set "
                               f"${self.cfg.api_key_env}")
        if r.status_code == 404:
            return  # some servers have no /models; a wrong model then fails on the first call
        if r.status_code >= 500:
            raise TeacherUnreachable(f"{self.url}/models answered HTTP {r.status_code}: "
                                     f"{r.text[:200]}")
        if r.status_code != 200:
            raise TeacherError(f"{self.url}/models answered HTTP {r.status_code}: {r.text[:200]}")
        try:
            served = [m["id"] for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TeacherError(f"{self.url}/models did not return an OpenAI model list") from None
        if served and self.cfg.model not in served:
            raise TeacherError(f"model {self.cfg.model!r} is not served at {self.url} "
                               f"(served: {', '.join(served[:10])})")

    async def __aenter__(self) -> ChatClient:
        limits = httpx.Limits(max_connections=self.cfg.concurrency * 2)
        self._client = httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits,
                                         headers=self.headers)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()

    def _cache_path(self, body: dict) -> Path | None:
        if not self.cache_dir:
            return None
        key = hashlib.sha256(json.dumps({"url": self.url, **body}, sort_keys=True)
                             .encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.json"

    async def chat(self, messages: list[dict], tools: list[dict] | None = None) -> dict:
        """One chat completion; returns the assistant message dict (content, tool_calls)."""
        body: dict[str, Any] = {"model": self.cfg.model, "messages": messages,
                                "temperature": self.cfg.temperature,
                                "max_tokens": self.cfg.max_tokens}
        if tools:
            body["tools"] = tools
        cache = self._cache_path(body)
        if cache is not None and cache.exists():
            self.usage["cache_hits"] += 1
            data = json.loads(cache.read_text())
        else:
            data = await self._post(body)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, cache)
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise MalformedResponse(f"response has no choices[0].message: "
                                    f"{json.dumps(data)[:200]}") from None
        if not isinstance(message, dict):
            raise MalformedResponse("choices[0].message is not an object")
        usage = data.get("usage") or {}
        for k in ("prompt_tokens", "completion_tokens"):
            self.usage[k] += int(usage.get(k) or 0)
        return message

    async def _post(self, body: dict) -> dict:
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            self.usage["requests"] += 1
            try:
                r = await self._client.post(f"{self.url}/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem = f"{type(e).__name__}"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        raise MalformedResponse(f"response is not JSON: {r.text[:200]}") from None
                if r.status_code == 404 and "model" in r.text.lower():
                    raise TeacherError(f"model {self.cfg.model!r} not found at {self.url}: "
                                       f"{r.text[:200]}")
                if r.status_code not in RETRY_STATUS:
                    raise MalformedResponse(f"HTTP {r.status_code}: {r.text[:200]}")
                problem = f"HTTP {r.status_code}"
                retry_after = r.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            if attempt == self.cfg.max_retries:
                raise MalformedResponse(f"gave up after {attempt + 1} attempts: {problem}")
            self.usage["retries"] += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")


def _tool_call(call: dict, known: set[str]) -> tuple[str, dict]:
    try:
        name, args = parse_tool_call(call)
    except ValueError as e:
        raise MalformedResponse(f"tool call {e}") from None
    if name not in known:
        raise MalformedResponse(f"tool {name!r} is not one of {sorted(known)}")
    return name, args


async def solve(task: Task, log: TeamLog, client: ChatClient, tools: list[dict],
                max_turns: int) -> str | None:
    """Run the LLM team on one task, recording every message and tool call in ``log``."""
    actor = ACTOR_NAME.get(task.suite, "tool_agent")
    known = {t["function"]["name"] for t in tools}

    def system(role: str) -> dict:
        return {"role": "system", "content": PROMPTS[role]}

    async def ask(role: str, content: str) -> str:
        """One single-turn request to a role; its text, stripped."""
        reply = await client.chat([system(role), {"role": "user", "content": content}])
        return (reply.get("content") or "").strip()

    plan = await ask("planner", task.question)
    log.say("planner", plan)
    history = [system("actor"), {"role": "user", "content": f"{task.question}\n\nPlan:\n{plan}"}]
    evidence: list[str] = []
    proposed = None
    for _ in range(max_turns):
        reply = await client.chat(history, tools)
        calls = reply.get("tool_calls") or []
        thought = (reply.get("content") or "").strip() or None
        if not calls:
            text = thought or ""
            proposed = text.split("ANSWER:", 1)[-1].strip() if text else None
            if not proposed:
                raise MalformedResponse("the tool agent neither called a tool nor answered")
            verdict = await ask("verifier", f"Question: {task.question}\nProposed answer: "
                                f"{proposed}\nEvidence:\n" + "\n".join(evidence[-6:]))
            log.say("verifier", verdict)
            if verdict.upper().startswith("REJECTED"):
                log.note("verifier", caught="rejected answer")
                history += [{"role": "assistant", "content": text},
                            {"role": "user", "content": f"Verifier: {verdict}"}]
                proposed = None
                continue
            break
        history.append({"role": "assistant", "content": reply.get("content") or "",
                        "tool_calls": calls})
        for call in calls:
            name, args = _tool_call(call, known)
            # In a thread: a sandboxed python call takes ~0.1 s and must not stall the other
            # conversations waiting on the event loop.
            obs = await asyncio.to_thread(log.call, actor, name, args, thought)
            thought = None  # the thought belongs to the first call of a turn
            evidence.append(f"{name}({json.dumps(args)}) -> {obs[:600]}")
            history.append({"role": "tool", "tool_call_id": call.get("id", ""), "content": obs})
        critique = await ask("critic", f"Question: {task.question}\nLast tool result:\n"
                             f"{evidence[-1]}")
        log.say("critic", critique)
        history.append({"role": "user", "content": f"Critic: {critique}"})
    if proposed is None:
        return None
    answer = await ask("answerer", f"Question: {task.question}\nThe team's answer: {proposed}")
    return answer or proposed
