"""The chain-of-agents trajectory: one model of it, shared by every stage.

A trajectory follows the Agent Data Protocol (ADP): an ordered list of *actions* (messages, API/tool
calls, code) and *observations* (text from the user or the environment). Every tool call (an
``ApiAction`` or a ``CodeAction``) carries a ``tool_call_id`` and is answered by exactly one
observation with the same id, later in the list; only the calls a trajectory ends on may be
unanswered (real data stops there; the gate quarantines them, the schema keeps them).

coaflow extends ADP for chain-of-agents distillation:

- ``agent`` on every step: which member of the teacher team produced it (``planner``, a named tool
  agent such as ``searcher`` or ``coder``, ``critic``, ``verifier``, ``answerer``; ``user`` and
  ``environment`` for observations);
- ``task``: where the trajectory comes from and what the right answer is;
- ``outcome``: what the team answered and how it scored;
- ``provenance``: who made it, with which tools, seed and clock.

ADP conversions live in ``convert.py``; rendering to chat messages for training in ``render.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = "1.0.0"

# Team roles that have their own tag in rendered text. Tool agents are free-form names
# (``searcher``, ``coder``, ...): a team may have as many as it has tools.
PLANNER, CRITIC, VERIFIER, ANSWERER = "planner", "critic", "verifier", "answerer"
ENVIRONMENT = "environment"


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MessageAction(_Strict):
    """Text the agent says: a plan, a reflection, a verification or the answer."""

    class_: Literal["message_action"] = "message_action"
    agent: str = ANSWERER
    content: str
    description: str | None = None
    reasoning_content: str | None = None


class ApiAction(_Strict):
    """A tool call: ``function(**kwargs)``."""

    class_: Literal["api_action"] = "api_action"
    agent: str = "tool_agent"
    function: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    tool_call_id: str
    description: str | None = Field(None, description="the thought that led to this call")
    reasoning_content: str | None = None


class CodeAction(_Strict):
    """Code the agent runs in the environment's interpreter; rendered as a ``python`` tool call."""

    class_: Literal["code_action"] = "code_action"
    agent: str = "coder"
    language: str = "python"
    content: str
    tool_call_id: str
    description: str | None = None
    reasoning_content: str | None = None


class TextObservation(_Strict):
    """Text the agent receives: the user's question or a tool's output."""

    class_: Literal["text_observation"] = "text_observation"
    source: Literal["user", "environment", "agent"] = ENVIRONMENT
    content: str
    name: str | None = Field(None, description="tool name for environment observations")
    tool_call_id: str | None = None


Step = Annotated[
    MessageAction | ApiAction | CodeAction | TextObservation, Field(discriminator="class_")
]
ToolCall = (ApiAction, CodeAction)


class Task(_Strict):
    suite: str
    task_id: str
    split: str = "train"
    question: str
    answer: str | list[str] | None = Field(None, description="reference answer(s); None if unknown")
    difficulty: int | str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, description="gold hop chain, tags, ...")


class Outcome(_Strict):
    final_answer: str | None = None
    reward: float | None = None
    correct: bool | None = None
    recovered: bool = Field(False, description="the team made a mistake and caught it")


class Provenance(_Strict):
    teacher: str = Field("unknown", description="scripted | llm | policy | import")
    model: str | None = None
    tool_versions: dict[str, str] = Field(default_factory=dict)
    seed: int | None = None
    source: str | None = Field(None, description="file the trajectory was imported from")
    started_at: datetime | None = None
    finished_at: datetime | None = None


class Trajectory(_Strict):
    schema_version: str = SCHEMA_VERSION
    id: str
    task: Task
    content: list[Step]
    outcome: Outcome = Field(default_factory=Outcome)
    provenance: Provenance = Field(default_factory=Provenance)
    available_apis: list[str] | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tool_calls_answered_once(self) -> Trajectory:
        problems = tool_link_problems(self.content, trailing_ok=True)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def tool_calls(self) -> list[ApiAction | CodeAction]:
        return [s for s in self.content if isinstance(s, ToolCall)]


def tool_link_problems(content: list, trailing_ok: bool = False) -> list[str]:
    """Every tool call is answered by exactly one later observation with its id, and no
    observation answers an id that was never called. ``trailing_ok``: calls after the last
    observation (the trajectory stops on them) may be unanswered.

    >>> call = ApiAction(function="search", kwargs={"query": "x"}, tool_call_id="c1")
    >>> tool_link_problems([call])
    ["content[0]: tool call 'c1' (search) has no observation"]
    >>> tool_link_problems([call, TextObservation(content="hit", tool_call_id="c1")])
    []
    >>> tool_link_problems([TextObservation(source="user", content="q"), call], trailing_ok=True)
    []
    """
    last_obs = max((i for i, s in enumerate(content) if isinstance(s, TextObservation)),
                   default=-1)
    problems, open_calls, seen_ids, answered = [], {}, set(), set()
    for i, step in enumerate(content):
        if isinstance(step, ToolCall):
            if step.tool_call_id in seen_ids:
                problems.append(f"content[{i}]: tool_call_id {step.tool_call_id!r} used twice")
            seen_ids.add(step.tool_call_id)
            open_calls[step.tool_call_id] = (i, getattr(step, "function", "python"))
        elif isinstance(step, TextObservation) and step.tool_call_id is not None:
            tid = step.tool_call_id
            if tid in answered:
                problems.append(f"content[{i}]: second observation for tool call {tid!r}")
            elif tid not in open_calls:
                problems.append(f"content[{i}]: observation for unknown tool call {tid!r}")
            else:
                answered.add(tid)
                del open_calls[tid]
    for tid, (i, fn) in open_calls.items():
        if trailing_ok and i > last_obs:
            continue
        problems.append(f"content[{i}]: tool call {tid!r} ({fn}) has no observation")
    return problems
