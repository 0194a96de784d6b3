"""The one multi-turn agent loop: a chat model acts in a suite's environment, episode by episode.

Each turn the model sees the episode so far rendered exactly as SFT renders a trajectory
(``models.prompt.to_example``: the default system prompt with the suite's tool schemas, the
question, its own earlier turns with their tool calls, every observation as a ``tool`` message)
and writes one assistant turn. The loop reads it back:

- an ``<answer>`` ends the episode (scored with the suite's reward);
- tool calls (``models.toolcalls.parse_tool_calls``) run with the suite's real tools
  (``envs.call_tool``) and their results are appended for the next turn; a call identical to an
  earlier one, a call to a tool the suite does not have and a call that does not parse are
  answered with an ``Error:`` observation instead, and the episode goes on;
- a turn cut off by the per-turn token budget, a turn with neither, a prompt that no longer fits
  the context, or ``max_turns`` turns end the episode without an answer.

Every episode becomes a coaflow ``Trajectory`` (``provenance.teacher = "policy"``;
``details`` holds ``stop``, ``turns``, ``tool_calls``, ``tokens``, ``format_errors``,
``repeated_calls``), so eval traces go through ``coaflow data stats``, the gate and conversion.

Backends: ``TransformersBackend`` generates for all live episodes of a batch at once (finished
episodes leave the batch every turn); ``OpenAIBackend`` runs ``concurrency`` episodes at once
against an endpoint. ``run_episodes`` drives either.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from coaflow.schema import (
    ApiAction,
    CodeAction,
    MessageAction,
    Outcome,
    Provenance,
    Task,
    TextObservation,
    Trajectory,
)
from coaflow.schema.render import DEFAULT_SYSTEM_PROMPT, RAW_AGENT, extract_answer
from coaflow.schema.trajectory import utcnow

Stop = Literal["answer", "max_turns", "turn_tokens", "context", "no_action"]
CALL_FORMAT = ('<tool_call>\n{"name": <tool name>, "arguments": {<argument>: <value>}}\n'
               '</tool_call>')


@dataclass
class Completion:
    """One generated assistant turn: its text (tool calls as ``<tool_call>`` blocks), the tokens
    it took, and why it ended: ``stop`` (end of turn), ``length`` (the per-turn token budget) or
    ``context`` (the prompt did not fit; nothing was generated)."""

    text: str
    tokens: int
    finish: Literal["stop", "length", "context"] = "stop"


class Episode:
    """One task in progress: the trajectory so far, the environment, the budgets."""

    def __init__(self, task: Task, *, max_turns: int, model: str, index: int = 0,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, env_kw: dict | None = None):
        from coaflow.envs import make_env, task_to_row, tool_schemas

        self.task, self.max_turns, self.system_prompt = task, max_turns, system_prompt
        self.tools = tool_schemas(task.suite)
        self.tool_names = [t["function"]["name"] for t in self.tools]
        self.env = make_env(task.suite, **(env_kw or {}))
        self.env.reset(**task_to_row(task))
        self.content: list[Any] = [TextObservation(source="user", content=task.question)]
        self.id = f"{task.task_id}-policy-{index}"
        self.model, self.started = model, utcnow()
        self.answer: str | None = None
        self.stop: Stop | None = None
        self.turns = self.tokens = self.calls = self.format_errors = self.repeated = 0
        self._seen: set[str] = set()

    @property
    def done(self) -> bool:
        return self.stop is not None

    def prompt(self) -> tuple[list[dict], list[dict] | None]:
        """``(messages, tools)``: the episode so far as the one prompt layer renders a trajectory
        (``models.prompt.to_example``: system prompt, question, earlier turns, observations, and
        the suite's tool schemas)."""
        from coaflow.models.prompt import to_example

        partial = Trajectory.model_construct(id=self.id, task=self.task, content=self.content)
        example = to_example(partial, self.system_prompt)
        return example["messages"], example["tools"]

    def advance(self, c: Completion) -> None:
        """Take one generated turn: record it, run its tool calls, decide whether to go on."""
        from coaflow.models.toolcalls import TOOL_CALL_RE, parse_tool_calls

        if c.finish == "context":
            self.stop = "context"
            return
        self.turns += 1
        self.tokens += c.tokens
        text = c.text.strip()
        answer = extract_answer(text)
        calls = parse_tool_calls(text)
        if answer is not None or c.finish == "length" or not calls:
            if text:
                self.content.append(MessageAction(agent=RAW_AGENT, content=text))
            self.answer = answer
            self.stop = "answer" if answer is not None else \
                "turn_tokens" if c.finish == "length" else "no_action"
            return
        bad = [call["error"] for call in calls if "error" in call]
        if bad:
            self.format_errors += 1
            self.content.append(MessageAction(agent=RAW_AGENT, content=text))
            self.content.append(TextObservation(
                source="environment", content=f"Error: malformed tool call ({bad[0]}). Write "
                f"each call as {CALL_FORMAT} with one of: {', '.join(self.tool_names)}."))
        else:
            thought = TOOL_CALL_RE.sub("", text).strip()
            if thought:
                self.content.append(MessageAction(agent=RAW_AGENT, content=thought))
            for call in calls:
                self._call(call["name"], call["arguments"])
        if self.turns >= self.max_turns:
            self.stop = "max_turns"

    def _call(self, name: str, args: dict) -> None:
        from coaflow.envs import call_tool

        self.calls += 1
        call_id = f"call_{self.calls}"
        if name == "python" and set(args) == {"code"} and isinstance(args["code"], str):
            self.content.append(CodeAction(agent=RAW_AGENT, content=args["code"],
                                           tool_call_id=call_id))
        else:
            self.content.append(ApiAction(agent=RAW_AGENT, function=name, kwargs=args,
                                          tool_call_id=call_id))
        key = json.dumps([name, args], sort_keys=True)
        if name not in self.tool_names:
            self.format_errors += 1
            obs = f"Error: there is no tool {name!r}; tools: {', '.join(self.tool_names)}."
        elif key in self._seen:
            self.repeated += 1
            obs = ("Error: this exact call was already made and its result is above. Use it, "
                   "call something else, or answer.")
        else:
            obs = call_tool(self.task.suite, name, args, env=self.env)
        self._seen.add(key)
        self.content.append(TextObservation(source="environment", content=obs, name=name,
                                            tool_call_id=call_id))

    def trajectory(self) -> Trajectory:
        from coaflow.envs.rewards import score

        reward = score(self.task.suite, self.answer, self.task.answer)
        return Trajectory(
            id=self.id, task=self.task, content=self.content,
            outcome=Outcome(final_answer=self.answer, reward=reward, correct=reward == 1.0),
            provenance=Provenance(teacher="policy", model=self.model, started_at=self.started,
                                  finished_at=utcnow()),
            available_apis=self.tool_names,
            details={"stop": self.stop, "turns": self.turns, "tool_calls": self.calls,
                     "tokens": self.tokens, "format_errors": self.format_errors,
                     "repeated_calls": self.repeated})


def run_episodes(backend, tasks: list[Task], *, max_turns: int = 8, max_new_tokens: int = 256,
                 temperature: float = 0.0, seed: int = 0, samples: int = 1,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, tool_workers: int = 4,
                 progress: Callable[[int], None] | None = None) -> list[Trajectory]:
    """Run ``samples`` episodes of every task with ``backend``; trajectories in task order
    (the samples of a task together). Greedy at ``temperature`` 0; ``seed`` fixes sampling.
    ``progress(n)`` is called as ``n`` more episodes finish."""
    if max_turns < 1 or max_new_tokens < 1 or samples < 1:
        raise ValueError("max_turns, max_new_tokens and samples must be >= 1")
    episodes = [Episode(t, max_turns=max_turns, model=backend.name, index=i,
                        system_prompt=system_prompt) for t in tasks for i in range(samples)]
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    if getattr(backend, "asynchronous", False):
        asyncio.run(_run_async(backend, episodes, gen, progress))
    else:
        _run_batched(backend, episodes, gen, tool_workers, progress)
    return [e.trajectory() for e in episodes]


def _run_batched(backend, episodes: list[Episode], gen: dict, tool_workers: int,
                 progress: Callable[[int], None] | None) -> None:
    """Turn by turn: every live episode generates in the same ``backend.generate`` call, then all
    run their tool calls (in threads: the calc sandbox is a subprocess)."""
    reuse = getattr(backend, "prefix_cache", False)  # the backend keeps each episode's KV cache
    if reuse:
        backend.reset()
    with ThreadPoolExecutor(max(1, tool_workers)) as pool:
        live = list(episodes)
        while live:
            prompts = [e.prompt() for e in live]
            keys = {"keys": [e.id for e in live]} if reuse else {}
            completions = backend.generate([m for m, _ in prompts], [t for _, t in prompts],
                                           **gen, **keys)
            list(pool.map(lambda ec: ec[0].advance(ec[1]), zip(live, completions, strict=True)))
            still = [e for e in live if not e.done]
            if progress:
                progress(len(live) - len(still))
            live = still
    if reuse:
        backend.reset()


async def _run_async(backend, episodes: list[Episode], gen: dict,
                     progress: Callable[[int], None] | None) -> None:
    sem = asyncio.Semaphore(backend.concurrency)

    async def one(ep: Episode) -> None:
        async with sem:
            while not ep.done:
                c = await backend.acomplete(*ep.prompt(), **gen)
                await asyncio.to_thread(ep.advance, c)
        if progress:
            progress(1)

    async with backend.client:
        await asyncio.gather(*(one(e) for e in episodes))


def category(traj: Trajectory) -> str:
    """What became of an episode: solved | wrong_answer | budget_exhausted | malformed_call |
    no_answer."""
    d = traj.details
    if traj.outcome.final_answer is not None:
        return "solved" if traj.outcome.correct else "wrong_answer"
    if d.get("stop") in ("max_turns", "turn_tokens", "context"):
        return "budget_exhausted"
    return "malformed_call" if d.get("format_errors") else "no_answer"
