"""Load tasks from files: JSONL ``{"question", "answer"}`` and AFM's RL parquet layout.

AFM publishes its RL data as parquet rows with ``prompt`` (chat messages; the question is the
last user message), ``reward_model.ground_truth`` (a JSON string ``{"target": [answers...]}``)
and usually ``data_source``. Both loaders return ``coaflow.schema.Task`` objects; a row that
cannot be read raises ``DataError`` naming the file, the row (1-based line for JSONL, 0-based
row index for parquet) and the missing or bad field.

    tasks = load_tasks("afm_rl.parquet", suite="afm-qa", split="rl")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from coaflow.schema import Task
from coaflow.schema.io import DataError, iter_records


def load_tasks(path: str | Path, suite: str | None = None, split: str = "train") -> list[Task]:
    """Tasks from a ``.jsonl``/``.jsonl.gz`` or ``.parquet`` file (suite defaults to the file stem,
    or the parquet ``data_source`` column when present)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "no such file")
    if path.suffix == ".parquet":
        return _from_parquet(path, suite, split)
    name = suite or path.name.split(".")[0]
    return [_from_json(obj, path, line, name, split)
            for _, line, obj in iter_records(path, None)]


def _task_id(suite: str, question: str) -> str:
    return f"{suite}-{hashlib.sha1(question.encode()).hexdigest()[:12]}"


def _answer(value: Any, path: Path, row: int, field: str) -> str | list[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise DataError(path, row, field, f"expected a non-empty string or list of strings, "
                                      f"got {value!r}"[:200])


def _from_json(obj: Any, path: Path, line: int, suite: str, split: str) -> Task:
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(obj).__name__}")
    for key in ("question", "answer"):
        if key not in obj:
            raise DataError(path, line, key, "missing")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, line, "question", "expected a non-empty string")
    answer = _answer(obj["answer"], path, line, "answer")
    meta = {k: v for k, v in obj.items() if k not in ("question", "answer", "id", "difficulty")}
    return Task(suite=suite, task_id=str(obj.get("id") or _task_id(suite, question)), split=split,
                question=question, answer=answer, difficulty=obj.get("difficulty"),
                metadata={**meta, "source": str(path)})


def _from_parquet(path: Path, suite: str | None, split: str) -> list[Task]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(path, None, None, f"not a readable parquet file ({e})") from None
    for col in ("prompt", "reward_model"):
        if col not in frame.columns:
            raise DataError(path, None, col, f"missing column (columns: {', '.join(frame.columns)})")
    tasks = []
    for i, rec in enumerate(frame.to_dict("records")):
        question = _question(rec["prompt"], path, i)
        rm = rec["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise DataError(path, i, "reward_model.ground_truth", "missing")
        gt = rm["ground_truth"]
        if isinstance(gt, (str, bytes)):
            try:
                gt = json.loads(gt)
            except json.JSONDecodeError as e:
                raise DataError(path, i, "reward_model.ground_truth",
                                f"not valid JSON ({e.msg})") from None
        if not isinstance(gt, dict) or "target" not in gt:
            raise DataError(path, i, "reward_model.ground_truth.target", "missing")
        target = gt["target"]
        target = list(target) if hasattr(target, "tolist") else target
        answer = _answer(target, path, i, "reward_model.ground_truth.target")
        name = suite or str(rec.get("data_source") or path.stem)
        extra = rec.get("extra_info")
        meta = {"source": str(path), "row": i}
        if isinstance(extra, dict):
            meta["extra_info"] = {k: v for k, v in extra.items() if isinstance(v, (str, int, float))}
        tasks.append(Task(suite=name, task_id=_task_id(name, question), split=split,
                          question=question, answer=answer, metadata=meta))
    return tasks


def _question(prompt: Any, path: Path, row: int) -> str:
    """The last user message of a chat prompt (a list or numpy array of {role, content})."""
    messages = list(prompt) if prompt is not None and not isinstance(prompt, (str, dict)) else None
    if not messages:
        raise DataError(path, row, "prompt", "expected a non-empty list of chat messages")
    for j in range(len(messages) - 1, -1, -1):
        m = messages[j]
        if not isinstance(m, dict) or "role" not in m:
            raise DataError(path, row, f"prompt.{j}.role", "missing")
        if m["role"] == "user":
            content = m.get("content")
            if not isinstance(content, str) or not content.strip():
                raise DataError(path, row, f"prompt.{j}.content", "expected a non-empty string")
            return content
    raise DataError(path, row, "prompt", "no user message")
