"""The one prompt layer: what a student sees, and where its turn ends.

Every user of a model renders the same thing: SFT's training examples, rl's rollouts, evaluate and
the agent loop, the deploy smoke test, and the server (an OpenAI request's ``messages`` + ``tools``
go through the same chat template). An example is

    {"messages": [system, user, assistant (+ tool_calls), tool, ...], "tools": [schema, ...]}

with coaflow's system prompt (``schema.markup.DEFAULT_SYSTEM_PROMPT``: the team's roles and tags)
and the suite's tool schemas, which the chat template (``models.template``) writes into the system
turn, Hermes/Qwen style, as every real tool model is trained and served. A student trained without
the schemas makes no tool calls when a client sends ``tools=`` (measured: 0 of 60), and a base
model never told its tools cannot be compared with the student it becomes.

Tool-call arguments travel as JSON strings: an Arrow table (TRL's dataset) unifies the argument
objects of all calls into one struct, which would render every call with every other tool's keys
set to null. The template prints a string argument as is, and ``json.dumps`` gives the same text
as the template's ``tojson``.
"""

from __future__ import annotations

import json

from coaflow.schema.markup import DEFAULT_SYSTEM_PROMPT
from coaflow.schema.render import to_messages
from coaflow.schema.trajectory import Trajectory

END_OF_TURN = "<|im_end|>"


def tools_for(suite: str | None) -> list[dict] | None:
    """The tool schemas a task of ``suite`` shows the model (None for a suite coaflow has no
    environment for, such as imported data)."""
    from coaflow.envs import SUITES, tool_schemas

    return tool_schemas(suite) if suite in SUITES else None


def to_example(traj: Trajectory, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> dict:
    """One chat: ``{"messages", "tools"}``, tool-call arguments as JSON strings."""
    messages = []
    for m in to_messages(traj, system_prompt=system_prompt):
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {"name": c["function"]["name"], "arguments": json.dumps(
                    c["function"]["arguments"], ensure_ascii=False)}} for c in m["tool_calls"]]
        messages.append(m)
    return {"messages": messages, "tools": tools_for(traj.task.suite)}


def prompt_messages(example: dict) -> list[dict]:
    """The messages before the first assistant turn: what the model sees at inference."""
    out = []
    for m in example["messages"]:
        if m["role"] == "assistant":
            break
        out.append(m)
    return out


def render(example: dict, chat_template: str, generation_prompt: bool = False) -> str:
    """The text ``chat_template`` makes of one example, tools included."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[example["messages"]],
                                        tools=example.get("tools") or None,
                                        chat_template=chat_template,
                                        add_generation_prompt=generation_prompt)
    return rendered[0]


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end a generated turn: ``<|im_end|>``, and the tokenizer's EOS if it is
    another token. Every generator (agent backends, rl's vLLM engine, the server) stops on these."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    ids = [end] if isinstance(end, int) and end != tokenizer.unk_token_id else []
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and eos not in ids:
        ids.append(eos)
    if not ids:
        raise ValueError(f"the tokenizer has neither {END_OF_TURN} nor an EOS token")
    return ids
