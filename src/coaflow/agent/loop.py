"""The one multi-turn agent loop: a chat model acts in a suite's environment, episode by episode.

Each turn the model sees the episode so far rendered exactly as SFT renders a trajectory
(``models.prompt.to_example``: the default system prompt with the suite's tool schemas, the
question, its own earlier turns with their tool calls, every observation as a ``tool`` message)
and writes one assistant turn. The loop reads it back:

- an ``<answer>`` ends the episode (scored with the suite's reward);
- tool calls (``schema.markup.parse_tool_calls``) run with the suite's real tools
  (``envs.call_tool``) and their results are appended for the next turn; a call identical to an
  earlier one, a call to a tool the suite does not have and a call that does not parse are
  answered with an ``Error:`` observation instead, and the episode goes on;
- a turn cut off by the per-turn token budget (``turn_tokens``, the turn's number in
  ``cut_turn``), a turn that repeats one sentence over and over (``repetition``: a backend that
  sees it ends the turn early, ``repeats``), a third identical tool call (``repetition``), a turn
  with neither an answer nor a call (``no_action``), a prompt that no longer fits the context
  (``context``), or ``max_turns`` turns end the episode without an answer.

The budget (``agent.budget.Budget``: turns, tokens a turn) is per suite: ``budgets`` maps a suite
to its own, derived from the teacher's runs; ``max_turns`` / ``max_new_tokens`` serve the rest.

Every episode becomes a coaflow ``Trajectory`` (``provenance.teacher = "policy"``;
``details`` holds ``stop``, ``turns``, ``tool_calls``, ``tokens``, ``format_errors``,
``repeated_calls``, ``cut_turn``, ``budget``), so eval traces go through ``coaflow data stats``, the gate and conversion.

Backends: ``TransformersBackend`` generates for all live episodes of a batch at once (finished
episodes leave the batch every turn); ``OpenAIBackend`` runs ``concurrency`` episodes at once
against an endpoint. ``run_episodes`` drives either.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from coaflow.agent.budget import Budget
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
from coaflow.schema.markup import (
    CALL_FORMAT,
    DEFAULT_SYSTEM_PROMPT,
    TOOL_CALL_RE,
    extract_answer,
    parse_tool_calls,
)
from coaflow.schema.render import RAW_AGENT
from coaflow.schema.trajectory import utcnow

Stop = Literal["answer", "max_turns", "turn_tokens", "repetition", "context", "no_action"]


@dataclass
class Completion:
    """One generated assistant turn: its text (tool calls as ``<tool_call>`` blocks), the tokens
    it took, and why it ended: ``stop`` (end of turn), ``length`` (the per-turn token budget),
    ``repetition`` (the backend saw the text repeat itself, ``repeats``, and stopped early) or
    ``context`` (the prompt did not fit; nothing was generated)."""

    text: str
    tokens: int
    finish: Literal["stop", "length", "repetition", "context"] = "stop"


_SENTENCE_END = re.compile(r"[.!?;\n]+|</?[a-z_]+>")
REPEATS = 3        # a sentence this many times in one turn is a loop ...
REPEAT_WORDS = 4   # ... if it has at least this many words (numbers aside)
REPEATED_CALLS = 2  # the second repeat of an identical tool call ends the episode


def repeats(text: str, times: int = REPEATS, words: int = REPEAT_WORDS) -> bool:
    """Whether one sentence (numbers and case aside) of ``words`` or more words occurs ``times``
    or more in ``text``: a small model's plan loop, which would run until the turn's budget.

    >>> repeats("<plan>1. Find the employer of A. 2. Find the founder of the employer. "
    ...         "3. Find the founder of the employer. 4. Find the founder of the employer.")
    True
    >>> repeats("<plan>1. Find the employer of A. 2. Find the founder of B.</plan>")
    False
    """
    seen: Counter = Counter()
    for sentence in _SENTENCE_END.split(text):
        key = " ".join(re.sub(r"\d+", "#", sentence).lower().split())
        if len(re.findall(r"[a-z]+", key)) >= words:
            seen[key] += 1
            if seen[key] >= times:
                return True
    return False


class Episode:
    """One task in progress: the trajectory so far, the environment, the budgets."""

    def __init__(self, task: Task, *, max_turns: int, model: str, index: int = 0,
                 max_new_tokens: int = 256, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
                 env_kw: dict | None = None):
        from coaflow.envs import make_env, task_to_row, tool_schemas

        self.task, self.max_turns, self.system_prompt = task, max_turns, system_prompt
        self.max_new_tokens = max_new_tokens
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
        self.cut_turn: int | None = None  # the turn the token budget (or a loop) cut short
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
        if c.finish == "context":
            self.stop = "context"
            return
        self.turns += 1
        self.tokens += c.tokens
        text = c.text.strip()
        answer = extract_answer(text)
        calls = parse_tool_calls(text)
        cut = c.finish in ("length", "repetition")
        if answer is not None or cut or not calls:
            if text:
                self.content.append(MessageAction(agent=RAW_AGENT, content=text))
            self.answer = answer
            if answer is None and cut:
                self.cut_turn = self.turns
            self.stop = "answer" if answer is not None else "no_action" if not cut else \
                "repetition" if c.finish == "repetition" or repeats(text) else "turn_tokens"
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
        if self.repeated >= REPEATED_CALLS:
            self.stop = "repetition"
        elif self.turns >= self.max_turns:
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
                     "repeated_calls": self.repeated, "cut_turn": self.cut_turn,
                     "budget": [self.max_turns, self.max_new_tokens]})


def run_episodes(backend, tasks: list[Task], *, max_turns: int = 8, max_new_tokens: int = 256,
                 budgets: Mapping[str, Budget] | None = None, temperature: float = 0.0,
                 seed: int = 0, samples: int = 1,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, tool_workers: int = 4,
                 progress: Callable[[int], None] | None = None) -> list[Trajectory]:
    """Run ``samples`` episodes of every task with ``backend``; trajectories in task order
    (the samples of a task together). A task's budget is ``budgets[suite]``, else
    ``max_turns`` x ``max_new_tokens``. Greedy at ``temperature`` 0; ``seed`` fixes sampling.
    ``progress(n)`` is called as ``n`` more episodes finish."""
    default = Budget(max_turns, max_new_tokens)
    budget = {t.task_id: (budgets or {}).get(t.suite, default) for t in tasks}
    if samples < 1 or any(b.max_turns < 1 or b.max_new_tokens < 1 for b in budget.values()):
        raise ValueError("max_turns, max_new_tokens and samples must be >= 1")
    episodes = [Episode(t, max_turns=budget[t.task_id].max_turns, model=backend.name, index=i,
                        max_new_tokens=budget[t.task_id].max_new_tokens,
                        system_prompt=system_prompt) for t in tasks for i in range(samples)]
    gen = {"temperature": temperature, "seed": seed}
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
                                           max_new_tokens=token_budget(live), **gen, **keys)
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
                c = await backend.acomplete(*ep.prompt(), max_new_tokens=ep.max_new_tokens,
                                            **gen)
                await asyncio.to_thread(ep.advance, c)
        if progress:
            progress(1)

    async with backend.client:
        await asyncio.gather(*(one(e) for e in episodes))


def token_budget(episodes: list[Episode]) -> int | list[int]:
    """The ``max_new_tokens`` a sync backend gets for these episodes' turns: one number when they
    share it, else one per prompt."""
    limits = [e.max_new_tokens for e in episodes]
    return limits[0] if len(set(limits)) == 1 else limits


CATEGORIES = ("solved", "wrong_answer", "turn_tokens", "max_turns", "repetition", "context",
              "malformed_call", "no_answer")


def category(traj: Trajectory) -> str:
    """What became of an episode (``CATEGORIES``): solved | wrong_answer | turn_tokens (a turn
    ran out of tokens) | max_turns | repetition (a loop, ended early) | context (the prompt
    outgrew the model) | malformed_call (no answer, and calls that did not parse) | no_answer."""
    d = traj.details
    if traj.outcome.final_answer is not None:
        return "solved" if traj.outcome.correct else "wrong_answer"
    if d.get("stop") in ("max_turns", "turn_tokens", "repetition", "context"):
        return d["stop"]
    return "malformed_call" if d.get("format_errors") else "no_answer"
