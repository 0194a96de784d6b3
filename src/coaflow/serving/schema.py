"""The OpenAI chat-completions request, checked: a field the server cannot honour is a 400 naming
it, never a silent accept.

Two layers: ``ChatRequest`` (pydantic, strict: "8" is not 8, "yes" is not true, NaN is not a
number) checks each field's type and range; ``check`` checks what depends on several fields or
on the server (``n`` against ``--max-n``, ``tool_choice`` against ``tools``, ``top_logprobs``
without ``logprobs``, content parts a text model cannot read). What coaflow implements beyond
sampling: ``logprobs`` / ``top_logprobs`` (from the engine's own logits), ``tool_choice``
``"required"`` or a named function (the reply is started with ``<tool_call>`` and, for a named
function, its name: the model writes the arguments), ``parallel_tool_calls: false`` (the first
call is kept), ``seed`` (each sampled choice draws from its own seeded generator),
``stream_options.include_usage``. Refused with a 400: ``response_format`` other than text,
non-zero ``frequency_penalty`` / ``presence_penalty``, ``logit_bias``, audio output. Fields that
change nothing a client can observe (``user``, ``metadata``, ``store``, ``service_tier``) are
accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coaflow.schema.markup import TOOL_CALL, span

MAX_STOP, MAX_STOP_CHARS = 4, 256  # OpenAI's limit on stop sequences; a stop string's length
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
TOOL_OPEN = span(TOOL_CALL)[0]


class _Strict(BaseModel):
    # strict: "8" is not 8 and "yes" is not true; NaN/Infinity are not numbers
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class Function(_Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: Function


class ToolCallFunction(_Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The OpenAI chat request, each field checked for type and range (``check`` does the
    rest)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)  # bounded by the server's --max-n in ``check``
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    ignore_eos: bool = False  # vLLM's extra: generate max_tokens tokens (benchmarks)

    @field_validator("temperature", "top_p", "frequency_penalty", "presence_penalty",
                     mode="before")
    @classmethod
    def _int_is_a_number(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has 1 to {MAX_STOP_CHARS} characters")
        return v


def validation_message(err: Any) -> tuple[str, str]:
    """(field, message) of the first error of a ``RequestValidationError`` or pydantic
    ``ValidationError``, without the input value (it may be NaN, which JSON cannot carry)."""
    first = err.errors()[0]
    # pydantic names the branch of a union that failed ("str", "list[ContentPart]"): not a field
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and
           not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float", "bool")))]
    field = ".".join(loc) or "(body)"
    return field, f"{field}: {first.get('msg', 'invalid')}"


def check(req: ChatRequest, max_n: int) -> tuple[str, str] | None:
    """``(field, message)`` of the first thing in ``req`` this server cannot honour, or None.

    >>> r = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], tool_choice={})
    >>> check(r, 16)[0]
    'tool_choice'
    """
    if req.n > max_n:
        return "n", f"n: at most {max_n} choices per request (the server's --max-n), got {req.n}"
    names = [t.function.name for t in req.tools or []]
    choice = req.tool_choice
    if choice == "required" and not names:
        return "tool_choice", "tool_choice: 'required' needs at least one tool in tools"
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or \
                not isinstance(fn.get("name"), str):
            return "tool_choice", ('tool_choice: an object must be {"type": "function", '
                                   '"function": {"name": "<a tool in tools>"}}')
        if fn["name"] not in names:
            return "tool_choice", (f"tool_choice: no tool named {fn['name']!r} in tools "
                                   f"({', '.join(names) or 'none given'})")
    if req.top_logprobs is not None and not req.logprobs:
        return "top_logprobs", "top_logprobs: needs logprobs: true"
    for i, msg in enumerate(req.messages):
        for j, part in enumerate(msg.content if isinstance(msg.content, list) else []):
            where = f"messages.{i}.content.{j}"
            if part.type not in ("text", "refusal"):
                return f"{where}.type", (f"{where}.type: {part.type!r} parts are not supported: "
                                         "this server's models read text only")
            if part.text is None:
                return f"{where}.text", f"{where}.text: a text part needs text"
    if req.response_format and req.response_format.get("type", "text") != "text":
        return "response_format", (f"response_format: {req.response_format.get('type')!r} is "
                                   "not supported (no constrained decoding here); ask for JSON "
                                   "in the prompt")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name):
            return name, f"{name}: not supported (only 0)"
    if req.logit_bias:
        return "logit_bias", "logit_bias: not supported"
    if req.modalities and set(req.modalities) != {"text"}:
        return "modalities", "modalities: only [\"text\"] is supported"
    if getattr(req, "audio", None) is not None:
        return "audio", "audio: not supported (text output only)"
    if req.stream_options is not None and not req.stream:
        return "stream_options", "stream_options: only with stream: true"
    return None


def text_of(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; the model reads text."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def to_messages(req: ChatRequest, system_prompt: str | None) -> list[dict]:
    messages = []
    for msg in req.messages:
        m = msg.model_dump(exclude_none=True)
        m["content"] = text_of(m.get("content"))
        messages.append(m)
    if system_prompt and not any(m.get("role") in ("system", "developer") for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def request_tools(req: ChatRequest) -> list[dict] | None:
    """The request's tool schemas as the chat template renders them (as training did)."""
    if req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools or []]


def forced_start(req: ChatRequest) -> str:
    """The text the reply must start with to honour ``tool_choice``: a tool call, and for a
    named function its name (the layout of ``<tool_call>`` blocks coaflow's students and
    Qwen write).

    >>> forced_start(ChatRequest(model="m", messages=[{"role": "user", "content": "x"}],
    ...     tools=[{"function": {"name": "f"}}], tool_choice={"type": "function",
    ...     "function": {"name": "f"}}))
    '<tool_call>\\n{"name": "f", "arguments":'
    """
    if req.tool_choice == "required":
        return TOOL_OPEN + "\n"
    if isinstance(req.tool_choice, dict):
        return f'{TOOL_OPEN}\n{{"name": {json.dumps(req.tool_choice["function"]["name"])}, ' \
               '"arguments":'
    return ""
