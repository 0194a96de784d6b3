"""The prompt's vocabulary: the tags an assistant turn is written in, the system prompt that names
them, the one check of a turn's markup, and the ``<tool_call>`` text form both ways.

The whole team speaks as one assistant (Qwen3 / Hermes layout):

    planner -> <plan>    critic, verifier -> <reflection>    answerer -> <answer>
    a thought -> <think>    a tool call -> <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    a tool's reply (rendered by the chat template) -> <tool_response>

Everything that writes or reads these lives here: the renderer (``schema.render``), the gate's
validators, the rewards, the agent loop, the OpenAI backend, the server, the tiny model's
tokenizer and sft's decisive spans import them. (The chat templates in ``models.template`` spell
the same tags inside Jinja text.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from coaflow.schema.trajectory import ANSWERER, CRITIC, PLANNER, VERIFIER

THINK, PLAN, REFLECTION, ANSWER, TOOL_CALL, TOOL_RESPONSE = (
    "think", "plan", "reflection", "answer", "tool_call", "tool_response")
ROLE_TAGS = {PLANNER: PLAN, CRITIC: REFLECTION, VERIFIER: REFLECTION, ANSWERER: ANSWER}

DEFAULT_SYSTEM_PROMPT = (
    "You are a team of agents in one model. Plan in <plan>...</plan>, think in <think>...</think>, "
    "call tools to gather evidence, check each result in <reflection>...</reflection>, and give the "
    "final answer, short and exact, in <answer>...</answer>."
)

TAG_RE = re.compile(rf"<(/?)({'|'.join((THINK, PLAN, REFLECTION, ANSWER, TOOL_CALL, TOOL_RESPONSE))})>")
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
CALL_FORMAT = ('<tool_call>\n{"name": <tool name>, "arguments": {<argument>: <value>}}\n'
               '</tool_call>')  # how the loop tells a model what a call looks like


def span(tag: str) -> tuple[str, str]:
    """``("<tag>", "</tag>")``."""
    return f"<{tag}>", f"</{tag}>"


def wrap(tag: str, text: str) -> str:
    """``wrap("plan", "x") == "<plan>x</plan>"``, unless the text already is so wrapped."""
    text = text.strip()
    opened, closed = span(tag)
    if text.startswith(opened) and text.endswith(closed):
        return text
    return f"{opened}{text}{closed}"


def extract_answer(text: str) -> str | None:
    """The last ``<answer>`` in a completion, stripped; None if there is none.

    >>> extract_answer("<think>hmm</think><answer> Paris </answer>")
    'Paris'
    >>> extract_answer("no tags") is None
    True
    """
    found = ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


# --- the one check ------------------------------------------------------------------------------

def tag_problems(text: str) -> list[str]:
    """What is wrong with the tags of ``text``: one left open, a closing tag without its opening
    one or closing another, a tag inside itself, or an ``<answer>`` or ``<tool_call>`` inside
    another tag (the gate's validators check each agent step with it; the format reward a whole
    completion).

    >>> tag_problems("<plan>a</plan><think>b</think>")
    []
    >>> tag_problems("<plan>a")
    ['unclosed <plan>']
    >>> tag_problems("<think>a</plan>")
    ['</plan> closes <think>']
    >>> tag_problems("<answer><answer>x</answer></answer>")
    ['<answer> inside <answer>']
    >>> tag_problems("<think>x<answer>a</answer></think>")
    ['<answer> inside <think>']
    """
    stack: list[str] = []
    for m in TAG_RE.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if not closing:
            if name in stack or (stack and name in (ANSWER, TOOL_CALL)):
                return [f"<{name}> inside <{stack[-1] if name not in stack else name}>"]
            stack.append(name)
        elif not stack:
            return [f"</{name}> without an opening tag"]
        elif stack[-1] != name:
            return [f"</{name}> closes <{stack[-1]}>"]
        else:
            stack.pop()
    return [f"unclosed <{t}>" for t in stack]


def format_problems(text: str) -> list[str]:
    """What makes a completion ill-formed: ``tag_problems``, not exactly one ``<answer>``, or a
    ``<tool_call>`` that does not parse (``parse_tool_calls``).

    >>> format_problems('<tool_call>{"name": "search", "arguments": {"q": "a"}}</tool_call>'
    ...                 '<answer>a</answer>')
    []
    >>> format_problems("<answer>a</answer><answer>b</answer>")
    ['2 answers; exactly one allowed']
    """
    problems = tag_problems(text)
    answers = sum(1 for m in TAG_RE.finditer(text) if m.group(2) == ANSWER and not m.group(1))
    if answers != 1:
        problems.append(f"{answers} answers; exactly one allowed")
    problems += [f"<tool_call>: {c['error']}" for c in parse_tool_calls(text) if "error" in c]
    return problems


# --- the <tool_call> text form ------------------------------------------------------------------

def tool_call_text(name: str | None, arguments) -> str:
    """One call as a model writes it; ``arguments`` that are a string and not JSON stay verbatim
    (the loop's parser then reports a malformed call).

    >>> tool_call_text("search", '{"query": "x"}')
    '<tool_call>\\n{"name": "search", "arguments": {"query": "x"}}\\n</tool_call>'
    """
    try:
        args = json.dumps(json.loads(arguments) if isinstance(arguments, str) else arguments,
                          ensure_ascii=False)
    except ValueError:
        args = str(arguments)
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n</tool_call>'


def message_text(message: dict) -> str:
    """An OpenAI assistant message as the text a chat model writes: its content, then one
    ``<tool_call>`` block per structured tool call.

    >>> message_text({"content": "ok", "tool_calls": [{"function": {"name": "search",
    ...     "arguments": '{"query": "x"}'}}]})
    'ok\\n<tool_call>\\n{"name": "search", "arguments": {"query": "x"}}\\n</tool_call>'
    """
    parts = [(message.get("content") or "").strip()]
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        parts.append(tool_call_text(fn.get("name"), fn.get("arguments", {})))
    return "\n".join(p for p in parts if p)


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
