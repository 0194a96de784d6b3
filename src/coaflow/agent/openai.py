"""The one HTTP client for OpenAI-compatible chat endpoints, and the agent backend built on it.

``ChatClient`` is built for long unattended runs: async with a concurrency limit, a per-request
timeout, retries with exponential backoff on 429 / 5xx / timeouts / dropped connections (honouring
``Retry-After``), and an optional on-disk cache of responses keyed by the request, so a rerun after
a crash replays finished conversations for free. ``check_endpoint`` runs before any work: an
unreachable URL, a rejected key or a model the server does not serve is one clear error. The LLM
teacher (``coaflow.teachers.llm``) and ``OpenAIBackend`` (the agent loop against vLLM,
``coaflow serve`` or a hosted API) both use it.
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

from coaflow.agent.loop import Completion
from coaflow.errors import PipelineError, ServiceUnavailable
from coaflow.schema.markup import message_text

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(PipelineError):
    """The endpoint cannot be used at all (key rejected, model not served, not an OpenAI API)."""


class EndpointUnreachable(ServiceUnavailable, EndpointError):
    """The endpoint did not answer or answered 5xx: retryable (exit code 75)."""


class MalformedResponse(ValueError):
    """One response could not be used (no choices, not JSON, retries exhausted)."""


class ChatClient:
    """Async chat-completions client; use ``async with client:`` around the requests."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None, *,
                 concurrency: int = 16, timeout_s: float = 60.0, max_retries: int = 5,
                 backoff_s: float = 1.0, cache_dir: Path | None = None, role: str = "model",
                 defaults: dict | None = None):
        """``role`` names the endpoint in errors ("teacher"); ``defaults`` are request
        parameters sent with every request (temperature, max_tokens)."""
        self.url, self.model, self.role = base_url.rstrip("/"), model, role
        self.defaults = dict(defaults or {})
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_s, self.cache_dir = max_retries, backoff_s, cache_dir
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cache_hits": 0,
                      "retries": 0}
        self._client: httpx.AsyncClient | None = None

    def check_endpoint(self) -> None:
        """Fail fast, before any work, if the endpoint or the model cannot be used. With no
        model given, the first one the server lists is used."""
        try:
            r = httpx.get(f"{self.url}/models", headers=self.headers, timeout=self.timeout_s)
        except httpx.HTTPError as e:
            raise EndpointUnreachable(f"cannot reach the {self.role} endpoint {self.url}: "
                                      f"{type(e).__name__}: {e}") from None
        if r.status_code in (401, 403):
            raise EndpointError(f"{self.url} rejected the API key (HTTP {r.status_code})")
        if r.status_code == 404 and self.model:
            return  # some servers have no /models; a wrong model then fails on the first call
        if r.status_code >= 500:
            raise EndpointUnreachable(f"{self.url}/models answered HTTP {r.status_code}: "
                                      f"{r.text[:200]}")
        if r.status_code != 200:
            raise EndpointError(f"{self.url}/models answered HTTP {r.status_code}: {r.text[:200]}")
        try:
            served = [m["id"] for m in r.json().get("data", [])]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EndpointError(f"{self.url}/models did not return an OpenAI model list") from None
        if self.model is None:
            if not served:
                raise EndpointError(f"{self.url}/models lists no model; name one")
            self.model = served[0]
        elif served and self.model not in served:
            raise EndpointError(f"model {self.model!r} is not served at {self.url} "
                                f"(served: {', '.join(served[:10])})")

    async def __aenter__(self) -> ChatClient:
        limits = httpx.Limits(max_connections=self.concurrency * 2)
        self._client = httpx.AsyncClient(timeout=self.timeout_s, limits=limits,
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

    async def completion(self, messages: list[dict], tools: list[dict] | None = None,
                         **params: Any) -> dict:
        """One chat completion; returns ``choices[0]`` (``message``, ``finish_reason``) with the
        response's ``usage`` added. ``params``: temperature, max_tokens, seed, ..."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.defaults,
                                **params}
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
            choice = dict(data["choices"][0])
        except (KeyError, IndexError, TypeError, ValueError):
            raise MalformedResponse(f"response has no choices[0]: {json.dumps(data)[:200]}") \
                from None
        if not isinstance(choice.get("message"), dict):
            raise MalformedResponse("choices[0].message is not an object")
        usage = data.get("usage") or {}
        for k in ("prompt_tokens", "completion_tokens"):
            self.usage[k] += int(usage.get(k) or 0)
        choice["usage"] = usage
        return choice

    async def chat(self, messages: list[dict], tools: list[dict] | None = None,
                   **params: Any) -> dict:
        """One chat completion; returns the assistant message dict (content, tool_calls)."""
        return (await self.completion(messages, tools, **params))["message"]

    async def _post(self, body: dict) -> dict:
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
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
                    raise EndpointError(f"model {self.model!r} not found at {self.url}: "
                                        f"{r.text[:200]}")
                if r.status_code not in RETRY_STATUS:
                    raise MalformedResponse(f"HTTP {r.status_code}: {r.text[:200]}")
                problem = f"HTTP {r.status_code}"
                retry_after = r.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            if attempt == self.max_retries:
                raise MalformedResponse(f"gave up after {attempt + 1} attempts: {problem}")
            self.usage["retries"] += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")


def to_openai(messages: list[dict]) -> list[dict]:
    """The loop's chat messages as a strict OpenAI API accepts them: an error observation that
    answers no tool call (a malformed call) goes back as a user message."""
    return [{"role": "user", "content": m["content"]} if m["role"] == "tool" and
            not m.get("tool_call_id") else m for m in messages]


class OpenAIBackend:
    """The agent loop's backend for any OpenAI-compatible endpoint (vLLM, ``coaflow serve``, a
    hosted API): ``concurrency`` episodes in flight, each request with a timeout and retries.

    Every request carries the suite's tool schemas as ``tools`` (``models.prompt``): ``coaflow
    serve`` renders them into the prompt exactly as training did, and a hosted API needs them to
    call tools (a vLLM server must be started with ``--enable-auto-tool-choice``)."""

    asynchronous = True

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, *,
                 concurrency: int = 16, timeout_s: float = 120.0, max_retries: int = 5,
                 backoff_s: float = 1.0):
        self.client = ChatClient(base_url, model, api_key, concurrency=concurrency,
                                 timeout_s=timeout_s, max_retries=max_retries,
                                 backoff_s=backoff_s)
        self.concurrency = concurrency
        self.client.check_endpoint()
        self.name = f"{self.client.url}#{self.client.model}"

    async def acomplete(self, messages: list[dict], tools: list[dict] | None, *, max_new_tokens: int,
                        temperature: float = 0.0, seed: int = 0) -> Completion:
        try:
            choice = await self.client.completion(
                to_openai(messages), tools,
                max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        except MalformedResponse as e:
            if "context" in str(e).lower() or "maximum" in str(e).lower():
                return Completion("", 0, "context")
            raise EndpointError(f"{self.client.url} ({self.client.model}): {e}") from None
        usage = choice["usage"]
        text = message_text(choice["message"])
        return Completion(text, int(usage.get("completion_tokens") or 0),
                          "length" if choice.get("finish_reason") == "length" else "stop")
