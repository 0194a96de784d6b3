"""Trajectory schema (ADP-compatible, extended for chain-of-agents), rendering, conversion, I/O."""

from coaflow.schema.io import DataError, ShardWriter, iter_records, read_trajectories, write_jsonl
from coaflow.schema.markup import extract_answer
from coaflow.schema.render import to_messages, to_text
from coaflow.schema.trajectory import (
    SCHEMA_VERSION,
    ApiAction,
    CodeAction,
    MessageAction,
    Outcome,
    Provenance,
    Task,
    TextObservation,
    Trajectory,
    tool_link_problems,
)

__all__ = [
    "SCHEMA_VERSION", "ApiAction", "CodeAction", "DataError", "MessageAction", "Outcome",
    "Provenance", "ShardWriter", "Task", "TextObservation", "Trajectory", "extract_answer",
    "iter_records", "read_trajectories", "to_messages", "to_text", "tool_link_problems",
    "write_jsonl",
]
