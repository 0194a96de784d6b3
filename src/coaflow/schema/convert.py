"""Conversions between coaflow trajectories and other agent-data formats.

- ADP (Agent Data Protocol) JSON, both ways. coaflow's extensions (task, outcome, provenance, the
  agent of each step) travel in ``details["coaflow"]``, and only when plain ADP would lose them, so
  ADP -> coaflow -> ADP gives back the same document (same steps, keys, nulls and order, unknown
  fields kept) and coaflow -> ADP -> coaflow the same trajectory.
- OpenAI chat messages (``{"messages": [...], "tools"?: [...], "answer"?: ...}`` per line), in.
- ShareGPT (``{"conversations": [{"from": "human"|"gpt"|"function_call"|"observation", ...}]}``), in.

Every ``from_*`` takes one parsed JSON record and raises ``ValueError`` naming the field at fault.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
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


# --- ADP ------------------------------------------------------------------------------------------
#
# Real ADP files (each dataset's ``sample_std.json``) differ from coaflow's strict steps: calls
# without ``tool_call_id``, ``null`` fields written out, fields coaflow has no place for
# (``reward``, newer top-level lists), CamelCase class names, other observation sources. Reading
# normalizes them; what plain ADP needs to be written back identically (same keys, same order, same
# values) is kept in ``traj.details[SHAPE]``, one entry per step that differs from coaflow's own
# dump, and dropped from the ADP ``details`` on the way out.

SHAPE = "adp_shape"
_SOURCES = {"assistant": "agent", "system": "environment"}  # ADP >= 1.2 observation sources
_TOP = ("schema_version", "id", "content", "available_apis", "details")  # coaflow writes these


def _link_calls(items: list[dict], shapes: list[dict]) -> None:
    """Give tool calls without a ``tool_call_id`` one and pair each with the observations that
    follow it, in order (the first unanswered call gets the next observation without an id);
    an observation right after a call that carries its own id lends it to the call, as ADP's
    converters do. Generated ids and changed sources are noted in ``shapes`` to undo on write."""
    taken = {it["tool_call_id"] for it in items if it.get("tool_call_id")}
    pending: list[str] = []
    n = 0
    for i, item in enumerate(items):
        prev = items[i - 1]["class_"] if i else None
        if item["class_"] in ("api_action", "code_action"):
            if item.get("tool_call_id"):
                continue
            nxt = items[i + 1] if i + 1 < len(items) else {}
            lent = nxt.get("tool_call_id") if nxt.get("class_") == "text_observation" else None
            if lent and lent not in {it.get("tool_call_id") for it in items[:i]}:
                item["tool_call_id"] = lent
            else:
                n += 1
                while f"call_{n:06d}" in taken:
                    n += 1
                item["tool_call_id"] = f"call_{n:06d}"
                taken.add(item["tool_call_id"])
                pending.append(item["tool_call_id"])
            shapes[i]["no_id"] = True
        elif item["class_"] == "text_observation" and not item.get("tool_call_id") and pending:
            if item.get("source") == "user" and prev not in ("api_action", "code_action"):
                continue  # the user speaking, not a tool answering
            item["tool_call_id"] = pending.pop(0)
            shapes[i]["no_id"] = True
            if item.get("source") == "user":
                shapes[i].setdefault("source", "user")
                item["source"] = "environment"


def _adp_step(step, shape: dict | None, order: dict[str, list[str]]) -> dict:
    """One coaflow step as the ADP step it was read from (``shape``; ``order``: the key order of
    each class in its document) or, without one, as coaflow's plain dump (no ``agent``, no
    nulls). Keys listed in the order but absent from the dump are written as ``null``."""
    out = step.model_dump(exclude={"agent"}, exclude_none=True)
    shape = shape or {}
    if shape.get("no_id"):
        out.pop("tool_call_id", None)
    for key in ("class_", "source"):
        if key in shape:
            out[key] = shape[key]
    out.update(shape.get("extra", {}))
    keys = shape.get("keys") or order.get(out["class_"])
    if keys:
        out = {**{k: out.get(k) for k in keys}, **{k: v for k, v in out.items() if k not in keys}}
    return out


def _same(a: dict, b: dict) -> bool:
    """Equal, key order included (the order is what a reader of the file sees)."""
    return list(a.items()) == list(b.items())


def from_adp(doc: dict) -> Trajectory:
    if not isinstance(doc, dict):
        raise ValueError(f"an ADP trajectory is a JSON object, got {type(doc).__name__}")
    if not isinstance(doc.get("content"), list):
        raise ValueError("content: missing or not a list")
    details = dict(doc.get("details") or {})
    ext = details.pop(EXT, None)
    items, shapes = [], []
    for i, raw in enumerate(doc["content"]):
        if not isinstance(raw, dict) or "class_" not in raw:
            raise ValueError(f"content.{i}.class_: missing")
        item, shape = dict(raw), {}
        cls = _ADP_ALIASES.get(item["class_"], item["class_"])
        if cls not in _ADP_CLASSES:
            raise ValueError(f"content.{i}.class_: unknown class {raw['class_']!r}")
        if cls != item["class_"]:
            shape["class_"], item["class_"] = item["class_"], cls
        fields = _ADP_CLASSES[cls].model_fields
        extra = {k: item.pop(k) for k in list(item) if k not in fields or k == "agent"}
        if extra:
            shape["extra"] = extra
        if cls == "text_observation" and item.get("source") in _SOURCES:
            shape["source"], item["source"] = item["source"], _SOURCES[item["source"]]
        items.append(item)
        shapes.append(shape)
    _link_calls(items, shapes)
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
    shape = _doc_shape(doc, traj, shapes)
    if shape:
        traj.details = {**traj.details, SHAPE: shape}
    return traj


def _doc_shape(doc: dict, traj: Trajectory, shapes: list[dict]) -> dict:
    """What writing ``traj`` back needs to give ``doc`` again: per-step shapes, the key order of
    each step class (and of a step whose order differs from its class's), the ADP schema
    version, fields coaflow does not model, the top-level key order. Empty for a document
    coaflow itself wrote."""
    for shape in shapes:  # a null unknown field comes back from the key order alone
        extra = {k: v for k, v in shape.pop("extra", {}).items() if v is not None}
        if extra:
            shape["extra"] = extra
    raws = doc["content"]
    orders: dict[str, Counter] = {}
    for step, raw, shape in zip(traj.content, raws, shapes, strict=True):
        if not _same(_adp_step(step, shape, {}), raw):
            orders.setdefault(raw["class_"], Counter())[tuple(raw)] += 1
    order = {cls: list(c.most_common(1)[0][0]) for cls, c in orders.items()}
    for step, raw, shape in zip(traj.content, raws, shapes, strict=True):
        if not _same(_adp_step(step, shape, order), raw):
            shape["keys"] = list(raw)
    out: dict[str, Any] = {}
    if any(shapes):
        out["steps"] = [s or None for s in shapes]
    if order:
        out["order"] = order
    if doc.get("schema_version") is not None:
        out["schema_version"] = doc["schema_version"]
    extra = {k: v for k, v in doc.items() if k not in _TOP}
    if extra:
        out["extra"] = extra
    written = [k for k in _TOP if k in doc]
    if list(doc) != written or ("available_apis" in doc and doc["available_apis"] is None):
        out["keys"] = list(doc)
    return out


def to_adp(traj: Trajectory) -> dict:
    details = dict(traj.details)
    shape = details.pop(SHAPE, None) or {}
    steps = shape.get("steps") or [None] * len(traj.content)
    if len(steps) != len(traj.content):  # steps were added or removed since: plain dump
        steps = [None] * len(traj.content)
    plain: dict[str, Any] = {}
    if shape.get("schema_version"):
        plain["schema_version"] = shape["schema_version"]
    plain["id"] = traj.id
    order = shape.get("order", {})
    plain["content"] = [_adp_step(s, sh, order) for s, sh in zip(traj.content, steps, strict=True)]
    if traj.available_apis is not None:
        plain["available_apis"] = traj.available_apis
    plain["details"] = details
    plain.update(shape.get("extra", {}))
    if "keys" in shape:
        plain = {**{k: plain.get(k) for k in shape["keys"]},
                 **{k: v for k, v in plain.items() if k not in shape["keys"]}}
    try:
        if from_adp(plain) == traj:
            return plain
    except ValueError:  # the shape no longer fits the (edited) steps: write coaflow's own
        pass
    plain["details"] = {**details, EXT: {
        "schema_version": traj.schema_version,
        "task": traj.task.model_dump(mode="json"),
        "outcome": traj.outcome.model_dump(mode="json"),
        "provenance": traj.provenance.model_dump(mode="json"),
        "agents": [getattr(s, "agent", None) for s in traj.content],
    }}
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
