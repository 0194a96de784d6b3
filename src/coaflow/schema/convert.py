"""Conversions between coaflow trajectories and other agent-data formats.

- ADP (Agent Data Protocol) JSON, both ways. coaflow's extensions (task, outcome, provenance, the
  agent of each step) travel in ``details["coaflow"]``, and only when plain ADP would lose them, so
  ADP -> coaflow -> ADP gives back the same document and coaflow -> ADP -> coaflow the same
  trajectory.
- OpenAI chat messages (``{"messages": [...], "tools"?: [...], "answer"?: ...}`` per line), in.
- ShareGPT (``{"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", ...}]}``), in.

Every ``from_*`` takes one parsed JSON record and raises ``ValueError`` naming the field at fault.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from coaflow.schema.render import RAW_AGENT
from coaflow.schema.trajectory import (
    SCHEMA_VERSION,
    ApiAction,
    CodeAction,
    MessageAction,
    TextObservation,
    Trajectory,
)

EXT = "coaflow"
_ADP_CLASSES = {"api_action": ApiAction, "code_action": CodeAction,
                "message_action": MessageAction, "text_observation": TextObservation}
# ADP files in the wild also spell classes in CamelCase.
_ADP_ALIASES = {"ApiAction": "api_action", "APIAction": "api_action", "CodeAction": "code_action",
                "MessageAction": "message_action", "TextObservation": "text_observation"}
_DEFAULT_AGENT = {"api_action": "tool_agent", "code_action": "coder", "message_action": RAW_AGENT}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _first_user_text(content: list) -> str:
    for step in content:
        if isinstance(step, TextObservation) and step.source == "user":
            return step.content
    return ""


def _backfill_tool_call_ids(items: list[dict]) -> None:
    """Link a tool call without an id to the observation right after it (ADP's own rule)."""
    n = 0
    for i, item in enumerate(items):
        if item.get("class_") in ("api_action", "code_action") and not item.get("tool_call_id"):
            n += 1
            item["tool_call_id"] = f"call_{n:06d}"
            nxt = items[i + 1] if i + 1 < len(items) else None
            if nxt and nxt.get("class_") == "text_observation" and not nxt.get("tool_call_id"):
                nxt["tool_call_id"] = item["tool_call_id"]
                if nxt.get("source") == "user":
                    nxt["source"] = "environment"


# --- ADP ------------------------------------------------------------------------------------------

def from_adp(doc: dict) -> Trajectory:
    if not isinstance(doc, dict):
        raise ValueError(f"an ADP trajectory is a JSON object, got {type(doc).__name__}")
    if not isinstance(doc.get("content"), list):
        raise ValueError("content: missing or not a list")
    details = dict(doc.get("details") or {})
    ext = details.pop(EXT, None)
    items = []
    for i, raw in enumerate(doc["content"]):
        if not isinstance(raw, dict) or "class_" not in raw:
            raise ValueError(f"content.{i}.class_: missing")
        item = dict(raw)
        item["class_"] = _ADP_ALIASES.get(item["class_"], item["class_"])
        if item["class_"] not in _ADP_CLASSES:
            raise ValueError(f"content.{i}.class_: unknown class {raw['class_']!r}")
        items.append(item)
    _backfill_tool_call_ids(items)
    agents = (ext or {}).get("agents") or [_DEFAULT_AGENT.get(it["class_"]) for it in items]
    for item, agent in zip(items, agents, strict=False):
        if agent is not None and item["class_"] != "text_observation":
            item.setdefault("agent", agent)
    if ext:
        task, outcome, provenance = ext["task"], ext.get("outcome", {}), ext.get("provenance", {})
        version = ext.get("schema_version", SCHEMA_VERSION)
    else:
        task = {"suite": details.get("dataset", "adp"), "task_id": str(doc.get("id", "")),
                "split": "train", "question": ""}
        outcome, provenance, version = {}, {"teacher": "import"}, SCHEMA_VERSION
    traj = Trajectory.model_validate({
        "schema_version": version, "id": str(doc.get("id") or _digest(doc["content"])),
        "task": task, "content": items, "outcome": outcome, "provenance": provenance,
        "available_apis": doc.get("available_apis"), "details": details,
    })
    if not ext and not traj.task.question:
        traj.task.question = _first_user_text(traj.content)
    if not ext and doc.get("schema_version"):
        traj.details = {**traj.details, "adp_schema_version": doc["schema_version"]}
    return traj


def to_adp(traj: Trajectory) -> dict:
    details = dict(traj.details)
    adp_version = details.pop("adp_schema_version", None)
    plain: dict[str, Any] = {}
    if adp_version:
        plain["schema_version"] = adp_version
    plain["id"] = traj.id
    plain["content"] = [s.model_dump(exclude={"agent"}, exclude_none=True) for s in traj.content]
    if traj.available_apis is not None:
        plain["available_apis"] = traj.available_apis
    plain["details"] = details
    if from_adp(plain) == traj:
        return plain
    plain["details"] = {**details, EXT: {
        "schema_version": traj.schema_version,
        "task": traj.task.model_dump(mode="json"),
        "outcome": traj.outcome.model_dump(mode="json"),
        "provenance": traj.provenance.model_dump(mode="json"),
        "agents": [getattr(s, "agent", None) for s in traj.content],
    }}
    if adp_version:
        plain["details"]["adp_schema_version"] = adp_version
    return plain


# --- OpenAI chat messages -------------------------------------------------------------------------

def parse_tool_call(call: Any) -> tuple[str, dict]:
    """``{"function": {"name", "arguments"}}`` -> (name, arguments dict); arguments may be a JSON
    string (the OpenAI wire format) or an object. ValueError names the field at fault.

    >>> parse_tool_call({"function": {"name": "search", "arguments": '{"query": "x"}'}})
    ('search', {'query': 'x'})
    >>> parse_tool_call({"function": {"name": "search", "arguments": "{oops"}})
    Traceback (most recent call last):
    ValueError: function.arguments: not valid JSON (Expecting property name enclosed in double quotes)
    """
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not fn.get("name"):
        raise ValueError("function.name: missing")
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"function.arguments: not valid JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise ValueError("function.arguments: not a JSON object")
    return fn["name"], args


def from_messages(record: dict | list, suite: str = "import") -> Trajectory:
    """One chat (``{"messages": [...]}`` or a bare list of messages) -> Trajectory."""
    messages = record.get("messages") if isinstance(record, dict) else record
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: missing, empty or not a list")
    content: list[Any] = []
    details: dict[str, Any] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages.{i}.role: missing")
        role, text = m["role"], m.get("content") or ""
        if not isinstance(text, str):  # content parts: keep the text ones
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if role == "system":
            details["system"] = text
        elif role == "user":
            content.append(TextObservation(source="user", content=text))
        elif role == "assistant":
            if text:
                content.append(MessageAction(agent=RAW_AGENT, content=text))
            for j, call in enumerate(m.get("tool_calls") or []):
                try:
                    name, args = parse_tool_call(call)
                except ValueError as e:
                    raise ValueError(f"messages.{i}.tool_calls.{j}.{e}") from None
                content.append(ApiAction(agent="tool_agent", function=name, kwargs=args,
                                         tool_call_id=call.get("id") or f"call_{i}_{j}"))
        elif role == "tool":
            tid = m.get("tool_call_id")
            if tid is None:  # answer the oldest unanswered call
                answered = {s.tool_call_id for s in content if isinstance(s, TextObservation)}
                pending = [s.tool_call_id for s in content
                           if isinstance(s, ApiAction) and s.tool_call_id not in answered]
                tid = pending[0] if pending else None
            content.append(TextObservation(source="environment", content=text,
                                           name=m.get("name"), tool_call_id=tid))
        else:
            raise ValueError(f"messages.{i}.role: unknown role {role!r}")
    answer = record.get("answer") if isinstance(record, dict) else None
    return Trajectory(
        id=str(record.get("id") if isinstance(record, dict) and record.get("id") else
               _digest(messages)),
        task={"suite": suite, "task_id": _digest(messages), "question": _first_user_text(content),
              "answer": answer},
        content=content, provenance={"teacher": "import"}, details=details)


# --- ShareGPT -------------------------------------------------------------------------------------

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "tool": "tool",
                   "function_call": "function_call"}


def from_sharegpt(record: dict, suite: str = "import") -> Trajectory:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ValueError("conversations: missing, empty or not a list")
    messages: list[dict] = []
    if isinstance(record.get("system"), str):
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn:
            raise ValueError(f"conversations.{i}.from: missing")
        role = _SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"conversations.{i}.from: unknown speaker {turn['from']!r}")
        value = turn.get("value", "")
        if role == "function_call":
            try:
                call = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                raise ValueError(f"conversations.{i}.value: function_call is not JSON") from None
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"id": f"call_{i}", "function": {"name": call.get("name"),
                                                 "arguments": call.get("arguments", {})}}]})
        else:
            messages.append({"role": role, "content": value})
    out = {"messages": messages}
    for key in ("id", "answer"):
        if key in record:
            out[key] = record[key]
    return from_messages(out, suite=suite)


FROM = {"adp": from_adp, "openai": from_messages, "sharegpt": from_sharegpt,
        "coaflow": Trajectory.model_validate}
