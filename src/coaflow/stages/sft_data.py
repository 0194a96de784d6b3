"""Trajectories -> SFT examples, and the checks that fail a bad dataset before training starts.

An example is ``models.prompt.to_example``'s ``{"messages", "tools"}``: the one layout every
model user renders. TRL's ``SFTTrainer`` renders it with the chat template and
``assistant_only_loss``: the template's ``{% generation %}`` spans are the only trained tokens, so
tool observations, the system prompt, the tool schemas and the question get label -100.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from coaflow.errors import PipelineError
from coaflow.schema import DataError, read_trajectories
from coaflow.schema.markup import ANSWER, TOOL_CALL, span
from coaflow.schema.trajectory import Trajectory


def load_trajectories(path: str | Path) -> list[Trajectory]:
    """Every trajectory under ``path``; an empty or unreadable dataset is a PipelineError."""
    try:
        trajs = list(read_trajectories(path))
    except DataError as e:
        raise PipelineError(f"sft: cannot read the accepted trajectories: {e}") from None
    if not trajs:
        raise PipelineError(f"sft: no trajectories under {path} (the gate accepted none, or the "
                            "folder holds no .jsonl shards): nothing to train on")
    return trajs


def holdout_key(traj_id: str, seed: int) -> str:
    """Stable order for the held-out split: a hash of the id, so adding data keeps old picks.

    >>> holdout_key("a", 0) == holdout_key("a", 0) != holdout_key("a", 1)
    True
    """
    return hashlib.sha256(f"{seed}:{traj_id}".encode()).hexdigest()


def split_holdout(trajs: list[Trajectory], n: int, seed: int
                  ) -> tuple[list[Trajectory], list[Trajectory]]:
    """``(train, held_out)``: ``n`` trajectories (at most a fifth) kept out for the tool-call
    check after training."""
    n = min(n, len(trajs) // 5)
    held = set(sorted((t.id for t in trajs), key=lambda i: holdout_key(i, seed))[:n])
    return [t for t in trajs if t.id not in held], [t for t in trajs if t.id in held]


def tool_names(trajs: Iterable[Trajectory]) -> set[str]:
    return {("python" if c.class_ == "code_action" else c.function)
            for t in trajs for c in t.tool_calls()}


@dataclass
class DataStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    min_len: int = 0
    max_len: int = 0
    truncated: int = 0
    no_assistant: list[int] = field(default_factory=list)


def check_examples(tokenizer, examples: list[dict], chat_template: str | None, max_length: int,
                   source: str) -> DataStats:
    """Tokenize every example as TRL will (same template, assistant masks) and refuse, before any
    training, a dataset with nothing to learn: no examples, no assistant tokens anywhere, or a
    ``max_length`` below the shortest example. Examples without assistant tokens are listed in
    ``no_assistant`` (TRL would stop on them; the stage drops them)."""
    if not examples:
        raise PipelineError(f"sft: no training examples from {source}")
    st = DataStats(examples=len(examples))
    lengths = []
    for i, ex in enumerate(examples):
        out = tokenizer.apply_chat_template(ex["messages"], tools=ex.get("tools") or None,
                                            tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True,
                                            chat_template=chat_template)
        ids, mask = out["input_ids"], out["assistant_masks"]
        lengths.append(len(ids))
        trained = sum(mask[:max_length])
        st.tokens += len(ids)
        st.trained_tokens += trained
        if sum(mask) == 0:
            st.no_assistant.append(i)
    st.min_len, st.max_len = min(lengths), max(lengths)
    st.truncated = sum(n > max_length for n in lengths)
    if max_length < st.min_len:
        raise PipelineError(f"sft.max_length={max_length} is shorter than the shortest example "
                            f"({st.min_len} tokens; longest {st.max_len}) from {source}: raise it")
    if len(st.no_assistant) == len(examples):
        raise PipelineError(
            f"sft: every example from {source} is fully masked (no assistant tokens): the chat "
            "template's {% generation %} markers cover nothing, or the trajectories hold no "
            "agent steps")
    if st.trained_tokens == 0:
        raise PipelineError(f"sft: no assistant token falls within sft.max_length={max_length} "
                            f"in any example from {source}: raise it")
    return st


# Spans whose tokens decide the task: a tool call (its arguments: the name or number copied from
# the question or a page, the program) and the final answer. The rest of an assistant turn is
# predictable prose that dominates the loss of a small model without making it solve anything.
DECISIVE_SPANS = (span(TOOL_CALL), span(ANSWER))


def decisive_pairs(tokenizer) -> list[tuple[int, int]]:
    """``(open_id, close_id)`` of each decisive span whose tags are single tokens in
    ``tokenizer`` (Qwen3's own has ``<tool_call>`` but not ``<answer>``)."""
    vocab = tokenizer.get_vocab()
    return [(vocab[a], vocab[b]) for a, b in DECISIVE_SPANS if a in vocab and b in vocab]


def decisive_mask(input_ids, pairs: list[tuple[int, int]]):
    """Bool tensor like ``input_ids``: True on the tokens of every decisive span, both tags
    included.

    >>> import torch
    >>> decisive_mask(torch.tensor([[5, 1, 7, 8, 2, 5, 3, 9, 4]]), [(1, 2), (3, 4)]).int().tolist()
    [[0, 1, 1, 1, 1, 0, 1, 1, 1]]
    """
    import torch

    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for a, b in pairs:
        opened = (input_ids == a).cumsum(-1)
        is_close = input_ids == b
        closed_before = is_close.cumsum(-1) - is_close.long()
        mask |= opened > closed_before
    return mask

