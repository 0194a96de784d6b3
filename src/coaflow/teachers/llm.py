"""The LLM teacher: the same team (planner, tool agent, critic, verifier, answerer), each role a
prompt to any OpenAI-compatible chat endpoint, tools executed against the real environment.

The HTTP client is the agent's (``coaflow.agent.openai.ChatClient``: async, concurrency limit,
timeouts, retries with backoff, an on-disk response cache, an endpoint check before any work); the
team's protocol of roles is here. The single-model agent loop (``coaflow.agent``) is not used: the
teacher is several prompts, not one policy.

A response that cannot be used (no choices, a tool call with arguments that are not JSON, a tool
the suite does not have) raises ``MalformedResponse``; the stage records it as a failed attempt with
its reason and goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from pydantic import Field

from coaflow.agent.openai import ChatClient, MalformedResponse
from coaflow.schema import Task
from coaflow.schema.convert import parse_tool_call
from coaflow.section import Section
from coaflow.teachers.log import TeamLog

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
    temperature: float = Field(0.3, ge=0, description="sampling temperature of the team's calls")
    max_tokens: int = Field(1024, ge=1, description="completion tokens per call")
    max_turns: int = Field(8, ge=1, description="tool calls per task before giving up")
    cache: bool = Field(True, description="cache responses on disk under <workdir>/cache/llm")


def client_for(cfg: LlmTeacherConfig, cache_dir: Path | None) -> ChatClient:
    """The shared chat client (``coaflow.agent.openai``) configured from ``synthesize.llm``."""
    return ChatClient(cfg.base_url, cfg.model, os.environ.get(cfg.api_key_env or "") or None,
                      concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
                      max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, cache_dir=cache_dir,
                      role="teacher", defaults={"temperature": cfg.temperature,
                                                "max_tokens": cfg.max_tokens})


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
