"""The raw multi-agent log and its distillation into one chain-of-agents trajectory.

A teacher team works by exchanging messages and calling tools. Every event is appended to a
``TeamLog``: messages between agents (``to`` names the recipient), tool calls (run for real through
the environment, their observation recorded right after), and private notes an agent keeps for
itself (parsed values, decisions). The log is kept beside the trajectory for provenance.

``distill`` turns a log into the single-model trajectory the student learns from: the planner's
plan, each tool agent's thought and call, each observation, the critic's and verifier's
reflections and the answer. Hand-offs between agents ("searcher, find X") become the tool agent's
thought; private notes are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
from coaflow.schema.trajectory import utcnow


@dataclass
class TeamLog:
    task: Task
    env: Any  # the suite's environment instance; tools run on it
    suite: str
    events: list[dict] = field(default_factory=list)
    _calls: int = 0

    def say(self, agent: str, text: str, to: str = "team") -> None:
        self.events.append({"type": "message", "agent": agent, "to": to, "content": text})

    def note(self, agent: str, **data) -> None:
        self.events.append({"type": "note", "agent": agent, **data})

    def call(self, agent: str, tool: str, args: dict, thought: str | None = None) -> str:
        """Run a real tool call through the environment and record call and observation."""
        from coaflow.envs import call_tool

        self._calls += 1
        call_id = f"call_{self._calls}"
        self.events.append({"type": "tool_call", "agent": agent, "tool": tool, "args": args,
                            "call_id": call_id, "thought": thought})
        observation = call_tool(self.suite, tool, args, env=self.env)
        self.events.append({"type": "observation", "tool": tool, "call_id": call_id,
                            "content": observation})
        return observation

    def to_json(self) -> dict:
        return {"task_id": self.task.task_id, "suite": self.suite, "events": self.events}


def team_log(task: Task, seed: int) -> TeamLog:
    """A log over a fresh environment of ``task``'s suite, reset to the task (cheap: worlds and
    indexes are cached), so concurrent teams never share tool state; ``reset`` picks kbqa's
    world. Every teacher episode starts here: synthesize's and the evaluation's ceiling."""
    from coaflow.envs import make_env, task_to_row

    env = make_env(task.suite, seed=seed)
    env.reset(**task_to_row(task))
    return TeamLog(task=task, env=env, suite=task.suite)


def distill(log: TeamLog, traj_id: str, final_answer: str | None, provenance: Provenance,
            outcome: Outcome) -> Trajectory:
    content: list[Any] = [TextObservation(source="user", content=log.task.question)]
    handoff: dict[str, str] = {}  # pending instruction to a tool agent, becomes its thought
    for ev in log.events:
        kind = ev["type"]
        if kind == "message":
            if ev["to"] not in ("team", "user"):
                handoff[ev["to"]] = ev["content"]
                continue
            content.append(MessageAction(agent=ev["agent"], content=ev["content"]))
        elif kind == "tool_call":
            thought = " ".join(t for t in (handoff.pop(ev["agent"], None), ev.get("thought")) if t)
            if ev["tool"] == "python" and set(ev["args"]) == {"code"}:
                content.append(CodeAction(agent=ev["agent"], content=ev["args"]["code"],
                                          tool_call_id=ev["call_id"], description=thought or None))
            else:
                content.append(ApiAction(agent=ev["agent"], function=ev["tool"], kwargs=ev["args"],
                                         tool_call_id=ev["call_id"], description=thought or None))
        elif kind == "observation":
            content.append(TextObservation(source="environment", content=ev["content"],
                                           name=ev["tool"], tool_call_id=ev["call_id"]))
    if final_answer is not None:
        content.append(MessageAction(agent="answerer", content=final_answer))
    provenance = provenance.model_copy(update={"finished_at": utcnow()})
    return Trajectory(id=traj_id, task=log.task, content=content, outcome=outcome,
                      provenance=provenance)
