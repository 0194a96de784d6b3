"""Render a trajectory as chat messages for training and serving (Qwen3 tool-call layout).

The whole team speaks as one assistant. Consecutive agent steps merge into one assistant turn that
ends either with tool calls (``tool_calls`` on the message, one ``tool`` message per observation
after it) or with ``<answer>``. Each role's text is wrapped in its tag (``schema.markup``: the
tags and the system prompt); a tool agent's thought (``description`` / ``reasoning_content``) in
``<think>``.

Text from an ``assistant`` step (imported data that already carries its own markup) is kept as is.
"""

from __future__ import annotations

from typing import Any

from coaflow.schema.markup import DEFAULT_SYSTEM_PROMPT, ROLE_TAGS, THINK, wrap
from coaflow.schema.trajectory import (
    ApiAction,
    CodeAction,
    MessageAction,
    TextObservation,
    Trajectory,
)

RAW_AGENT = "assistant"  # an imported step that carries its own markup: its text is kept as is
__all__ = ["DEFAULT_SYSTEM_PROMPT", "RAW_AGENT", "step_text", "to_messages", "to_text",
           "tool_call_message"]


def step_text(step: MessageAction | ApiAction | CodeAction) -> str:
    """The assistant text one agent step contributes (tool calls themselves go in tool_calls)."""
    parts = []
    if step.reasoning_content:
        parts.append(wrap(THINK, step.reasoning_content))
    if isinstance(step, MessageAction):
        if step.agent == RAW_AGENT:
            parts.append(step.content.strip())
        else:
            parts.append(wrap(ROLE_TAGS.get(step.agent, THINK), step.content))
    elif step.description:
        parts.append(wrap(THINK, step.description))
    return "\n".join(p for p in parts if p)


def tool_call_message(step: ApiAction | CodeAction) -> dict[str, Any]:
    if isinstance(step, CodeAction):
        name, args = "python", {"code": step.content}
    else:
        name, args = step.function, dict(step.kwargs)
    return {"id": step.tool_call_id, "type": "function", "function": {"name": name, "arguments": args}}


def to_messages(traj: Trajectory, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """Trajectory -> ``[{"role": ..., "content": ..., "tool_calls"?: [...]}, ...]``."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if not any(isinstance(s, TextObservation) and s.source == "user" for s in traj.content):
        messages.append({"role": "user", "content": traj.task.question})
    turn: dict[str, Any] | None = None  # the assistant turn being built
    for step in traj.content:
        if isinstance(step, TextObservation):
            turn = None
            if step.tool_call_id is not None:
                messages.append({"role": "tool", "tool_call_id": step.tool_call_id,
                                 "name": step.name or "", "content": step.content})
            else:
                messages.append({"role": "user" if step.source == "user" else "tool" if
                                 step.source == "environment" else "assistant",
                                 "content": step.content})
            continue
        is_call = isinstance(step, (ApiAction, CodeAction))
        if turn is None or (turn.get("tool_calls") and not is_call):
            # Parallel calls share a turn; text after a call opens a new one.
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        text = step_text(step)
        if text:
            turn["content"] = f"{turn['content']}\n{text}" if turn["content"] else text
        if is_call:
            turn.setdefault("tool_calls", []).append(tool_call_message(step))
    return messages


def to_text(traj: Trajectory) -> str:
    """A plain, readable transcript (for notes, `coaflow data show`, debugging)."""
    lines = []
    for m in to_messages(traj, system_prompt=None):
        lines.append(f"[{m['role']}{'/' + m['name'] if m.get('name') else ''}] {m['content']}")
        for call in m.get("tool_calls", []):
            lines.append(f"  -> {call['function']['name']}({call['function']['arguments']})")
    return "\n".join(lines)
