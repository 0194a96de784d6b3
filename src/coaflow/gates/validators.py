"""Structural validators: is one trajectory well formed enough to train on?

Each check is a plain function ``check(traj, ...) -> list[Problem]`` where a problem is a
``(code, detail)`` pair; the codes are the quarantine reasons and the keys of the per-reason
counts in ``result.json``. An empty list means the trajectory passes.

Why each check exists: SFT imitates every assistant token, so a trajectory with an unanswered
tool call, an answer in the middle, a tool the suite does not have or arguments the tool would
reject teaches the student exactly that mistake.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from coaflow.schema.markup import ANSWER, ROLE_TAGS, extract_answer, span, tag_problems, wrap
from coaflow.schema.render import RAW_AGENT
from coaflow.schema.trajectory import (
    ANSWERER,
    ApiAction,
    CodeAction,
    MessageAction,
    TextObservation,
    Trajectory,
    tool_link_problems,
)

Problem = tuple[str, str]

TAGGED = {k: v for k, v in ROLE_TAGS.items() if v != ANSWER}  # answer text: checked as is
OPEN_ANSWER = span(ANSWER)[0]
JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


def _own_text(step) -> list[str]:
    """The texts of an agent step that may carry their own tags (the renderer only adds
    balanced ones around them)."""
    parts = [step.reasoning_content or ""]
    if isinstance(step, MessageAction):
        parts.append(step.content)
    else:
        parts.append(step.description or "")
    return [p for p in parts if "<" in p]


def check_tags(traj: Trajectory) -> list[Problem]:
    """Role tags balanced, thinking or a plan before the first tool call, exactly one answer, and
    nothing after it."""
    problems: list[Problem] = []
    answers: list[int] = []
    thought = False
    for i, step in enumerate(traj.content):
        if isinstance(step, TextObservation):
            if answers and step.source != "user":
                problems.append(("tag_order", f"content[{i}]: observation after the answer"))
            continue
        for text in _own_text(step):
            if isinstance(step, MessageAction) and step.agent in TAGGED:
                text = wrap(TAGGED[step.agent], text)  # "<plan>" inside a plan nests
            for p in tag_problems(text):
                problems.append(("unbalanced_tags", f"content[{i}] ({step.agent}): {p}"))
        if answers:
            problems.append(("tag_order", f"content[{i}] ({step.agent}): step after the answer"))
        is_call = isinstance(step, (ApiAction, CodeAction))
        if is_call and not thought and not (step.description or step.reasoning_content):
            problems.append(("tag_order", f"content[{i}]: tool call "
                             f"{_call_name(step)!r} before any plan or thought"))
        if isinstance(step, MessageAction) and (
                step.agent == ANSWERER or (step.agent == RAW_AGENT and OPEN_ANSWER in step.content)):
            answers.append(i)
        elif not is_call or step.description or step.reasoning_content:
            thought = True  # a plan, a reflection, a tool agent's note, or a call's own thought
    if len(answers) > 1:
        problems.append(("tag_order", f"{len(answers)} answers (content{answers}); exactly one "
                         "allowed"))
    return problems


def check_links(traj: Trajectory) -> list[Problem]:
    """The calls a trajectory ends on without an observation (the schema keeps them, so that
    imported data round-trips; training on them would teach calls that get no answer)."""
    return [("tool_link", p) for p in tool_link_problems(traj.content)]


def answer_text(traj: Trajectory) -> str | None:
    """The final answer the trajectory teaches: the answerer's message (or the ``<answer>`` of a
    raw assistant message), else ``outcome.final_answer``; None if there is none."""
    for step in reversed(traj.content):
        if isinstance(step, MessageAction):
            if step.agent == ANSWERER:
                inner = extract_answer(step.content)
                text = inner if inner is not None else step.content.strip()
                return text or None
            if step.agent == RAW_AGENT and OPEN_ANSWER in step.content:
                return extract_answer(step.content) or None
    fa = traj.outcome.final_answer
    return fa.strip() or None if isinstance(fa, str) else None


def check_answer(traj: Trajectory) -> list[Problem]:
    """A final answer is present and not empty."""
    if answer_text(traj) is None:
        return [("no_answer", "no answerer message and no outcome.final_answer")]
    return []


def _call_name(step: ApiAction | CodeAction) -> str:
    return step.function if isinstance(step, ApiAction) else "python"


def _call_args(step: ApiAction | CodeAction) -> dict:
    return step.kwargs if isinstance(step, ApiAction) else {"code": step.content}


def argument_problems(args: dict, parameters: dict) -> list[str]:
    """Arguments checked against a tool's JSON-schema ``parameters`` (names, required, types).

    >>> params = {"type": "object", "properties": {"query": {"type": "string"}},
    ...           "required": ["query"]}
    >>> argument_problems({"query": "x"}, params)
    []
    >>> argument_problems({"q": 1}, params)
    ["unknown argument 'q'", "missing required argument 'query'"]
    >>> argument_problems({"query": 3}, params)
    ["argument 'query' should be string, got int"]
    """
    props = parameters.get("properties") or {}
    out = []
    if props or parameters.get("additionalProperties") is False:
        out += [f"unknown argument {k!r}" for k in args if k not in props]
    out += [f"missing required argument {k!r}" for k in parameters.get("required", [])
            if k not in args]
    for k, v in args.items():
        want = (props.get(k) or {}).get("type")
        if want is None:
            continue
        kinds = want if isinstance(want, list) else [want]
        types = tuple(t for kind in kinds for t in JSON_TYPES.get(kind, (object,)))
        ok = isinstance(v, types) and not (isinstance(v, bool) and "boolean" not in kinds)
        if not ok:
            out.append(f"argument {k!r} should be {'/'.join(kinds)}, got {type(v).__name__}")
    out += [f"required argument {k!r} is empty" for k in parameters.get("required", [])
            if isinstance(args.get(k), str) and not args[k].strip()]
    return out


def tool_index(schemas: list[dict] | None) -> dict[str, dict] | None:
    """OpenAI function tool schemas -> {name: parameters}; None when the suite has none known."""
    if schemas is None:
        return None
    index = {}
    for s in schemas:
        fn = s.get("function", s)
        index[fn["name"]] = fn.get("parameters") or {}
    return index


def check_tools(traj: Trajectory, tools: dict[str, dict] | None) -> list[Problem]:
    """Every call names a tool the suite has, with arguments its schema accepts.

    ``tools`` is ``tool_index(tool_schemas(suite))``; when the suite is unknown (imported data)
    the trajectory's own ``available_apis``, if any, is the list of allowed names."""
    problems: list[Problem] = []
    allowed = set(tools) if tools is not None else (
        set(traj.available_apis) if traj.available_apis else None)
    for i, step in enumerate(traj.content):
        if not isinstance(step, (ApiAction, CodeAction)):
            continue
        name = _call_name(step)
        if allowed is not None and name not in allowed:
            problems.append(("unknown_tool", f"content[{i}]: {name!r} is not a tool of suite "
                             f"{traj.task.suite!r} (tools: {', '.join(sorted(allowed))})"))
            continue
        if tools is not None:
            for p in argument_problems(_call_args(step), tools[name]):
                problems.append(("bad_arguments", f"content[{i}] {name}: {p}"))
        bad = [k for k, v in _call_args(step).items()
               if isinstance(v, float) and not math.isfinite(v)]
        if bad:  # NaN/Infinity: read from JSON, but no chat template or server writes them back
            problems.append(("bad_arguments", f"content[{i}] {name}: argument {bad[0]!r} is not "
                             "a finite number"))
    return problems


def text_chars(traj: Trajectory) -> int:
    """Characters of text in the trajectory (question, messages, calls, observations)."""
    n = len(traj.task.question)
    for step in traj.content:
        if isinstance(step, ApiAction):
            n += len(step.function) + sum(len(str(v)) for v in step.kwargs.values())
        else:
            n += len(step.content)
        if not isinstance(step, TextObservation):
            n += len(step.description or "") + len(step.reasoning_content or "")
    return n


def check_length(chars: int, tokens: int | None, max_chars: int, max_tokens: int) -> list[Problem]:
    """Within the character cap, and within the SFT maximum in tokens when a tokenizer is given.

    >>> check_length(10, None, 100, 50)
    []
    >>> check_length(10, 60, 100, 50)
    [('too_long', '60 tokens > max_tokens 50')]
    """
    out = []
    if chars > max_chars:
        out.append(("too_long", f"{chars} characters > max_chars {max_chars}"))
    if tokens is not None and tokens > max_tokens:
        out.append(("too_long", f"{tokens} tokens > max_tokens {max_tokens}"))
    return out


def token_counter(tokenizer_path: str, schemas_for: Callable[[str], list | None]):
    """A function ``traj -> number of tokens`` of the rendered chat, as SFT will see it
    (``to_messages`` + the tokenizer's chat template with the suite's tools)."""
    from transformers import AutoTokenizer

    from coaflow.schema.render import to_messages

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as e:  # noqa: BLE001 - any loading failure is a config error
        raise ValueError(f"gate.tokenizer: cannot load a tokenizer from {tokenizer_path}: {e}") \
            from None
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"gate.tokenizer: {tokenizer_path} has no chat template")

    def count(traj: Trajectory) -> int:
        messages = to_messages(traj)
        ids = tok.apply_chat_template(messages, tools=schemas_for(traj.task.suite) or None,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)

    return count
