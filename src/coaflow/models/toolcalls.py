"""Read tool calls back out of generated text (Qwen3 layout) and judge whether they are usable.

A well-formed call is ``<tool_call>{"name": <known tool>, "arguments": {...}}</tool_call>``: the body
parses as JSON, the name is a tool the agent has, the arguments are an object. This is the check the
SFT stage reports on held-out prompts; the agent loop needs exactly this to act.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[dict]:
    """Every ``<tool_call>`` block in ``text`` as ``{"name", "arguments"}``, or ``{"error": why}``
    for a block that does not parse. An opened block never closed counts as an error.

    >>> parse_tool_calls('<tool_call>\\n{"name": "search", "arguments": {"query": "x"}}\\n</tool_call>')
    [{'name': 'search', 'arguments': {'query': 'x'}}]
    >>> parse_tool_calls('<tool_call>{"name": "search", "arguments": {"q"</tool_call>')
    [{'error': "not JSON: Expecting ':' delimiter"}]
    >>> parse_tool_calls('<tool_call>{"name": "search"')
    [{'error': 'unclosed <tool_call>'}]
    >>> parse_tool_calls('<answer>42</answer>')
    []
    """
    calls: list[dict] = []
    for body in TOOL_CALL_RE.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append({"error": f"not JSON: {e.msg}"})
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append({"error": "no string 'name'"})
        elif not isinstance(obj.get("arguments", {}), dict):
            calls.append({"error": "'arguments' is not an object"})
        else:
            calls.append({"name": obj["name"], "arguments": obj.get("arguments", {})})
    if text.count("<tool_call>") > text.count("</tool_call>"):
        calls.append({"error": "unclosed <tool_call>"})
    return calls


def well_formed_tool_call(text: str, tools: Iterable[str]) -> bool:
    """True when ``text`` holds at least one tool call and every call parses with a known name.

    >>> well_formed_tool_call('<tool_call>{"name": "python", "arguments": {"code": "1+1"}}</tool_call>',
    ...                       ["python"])
    True
    >>> well_formed_tool_call('<tool_call>{"name": "pyhton", "arguments": {}}</tool_call>', ["python"])
    False
    """
    known = set(tools)
    calls = parse_tool_calls(text)
    return bool(calls) and all("error" not in c and c["name"] in known for c in calls)


_SALIENT = re.compile(r"\b[A-Z][\w'-]{2,}\b|\d+(?:\.\d+)?")


def grounded_tool_call(question: str, calls: list[dict]) -> bool:
    """True when the first well-formed call is built from the question: it shares a name or a
    number with it (thousands separators ignored) and names nobody the question does not. A model
    that learned the format but not the task calls the same tool with the same, or half-copied,
    arguments whatever it is asked; this check tells them apart.

    >>> q = "Who founded Varn Labs?"
    >>> grounded_tool_call(q, [{"name": "search", "arguments": {"query": "Varn Labs"}}])
    True
    >>> grounded_tool_call(q, [{"name": "search", "arguments": {"query": "Ulad Labs"}}])
    False
    >>> grounded_tool_call("Pay 1,250 for 3 books", [{"name": "python",
    ...                     "arguments": {"code": "print(round(1250 / 3, 2))"}}])
    True
    """
    first = next((c for c in calls if "error" not in c), None)
    if first is None:
        return False
    asked = set(_SALIENT.findall(re.sub(r"(?<=\d),(?=\d{3})", "", question)))
    used = set(_SALIENT.findall(json.dumps(first.get("arguments", {}))))
    names = {u for u in used if not u[0].isdigit()}
    return bool(asked & used) and names <= asked
