"""Streaming JSONL shards (plain or ``.gz``) of trajectories or any pydantic model.

Reading is line by line, so a 10 GB shard never sits in memory. A bad line raises ``DataError``
naming the file, the line and the field at fault; with ``errors="skip"`` it is reported to the
``on_error`` callback (or collected) and reading goes on.

Writing goes to ``<name>.tmp`` and is renamed into place on close, so a killed writer never leaves
a shard that looks whole.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ValidationError

from coaflow.errors import UserError
from coaflow.schema.trajectory import Trajectory

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


class DataError(UserError, ValueError):
    """A record that cannot be read; ``str()`` is ``file:line: field: what is wrong``."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {field + ': ' if field else ''}{message}")


@dataclass
class BadRecord:
    path: str
    line: int
    reason: str
    field: str | None = None


def _open_write(path: Path, compress: bool) -> IO[str]:
    if compress:
        return io.TextIOWrapper(gzip.open(path, "wb"), encoding="utf-8")
    return open(path, "w", encoding="utf-8")


def validation_field(err: ValidationError) -> tuple[str, str]:
    """The first pydantic error as (dotted field path, message)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).endswith("_action")
                   and p != "text_observation")
    return loc or "(record)", first["msg"]


def shard_files(path: str | Path) -> list[Path]:
    """A file, or every shard in a folder (recursively, sorted)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
    if not path.exists():
        raise DataError(path, None, None, "no such file or folder")
    return [path]


def iter_records(
    path: str | Path,
    model: type[BaseModel] | Callable[[Any], Any] | None = Trajectory,
    errors: Literal["raise", "skip"] = "raise",
    on_error: Callable[[BadRecord], None] | None = None,
) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(file, line_number, record)`` for every line of every shard under ``path``.

    ``model`` is a pydantic model, any callable that parses a dict (a converter from
    ``convert.py``), or None for raw dicts.
    """
    parse = model.model_validate if isinstance(model, type) and issubclass(model, BaseModel) else model
    for file in shard_files(path):
        handle = gzip.open(file, "rb") if file.name.endswith(".gz") else open(file, "rb")
        with handle:
            lineno = 0
            while True:
                try:
                    raw = handle.readline()
                except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip
                    bad = BadRecord(str(file), lineno + 1, f"unreadable: {e}")
                    if errors == "raise":
                        raise DataError(file, lineno + 1, None, bad.reason) from None
                    (on_error or (lambda b: None))(bad)
                    break
                if not raw:
                    break
                lineno += 1
                if not raw.strip():
                    continue
                try:
                    record = _parse_line(file, lineno, raw, parse)
                except DataError as e:
                    if errors == "raise":
                        raise
                    (on_error or (lambda b: None))(BadRecord(e.path, lineno, e.message, e.field))
                    continue
                yield str(file), lineno, record


def _parse_line(file: Path, lineno: int, raw: bytes, parse) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(file, lineno, None, f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(file, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if parse is None:
        return obj
    try:
        return parse(obj)
    except ValidationError as e:
        field, msg = validation_field(e)
        raise DataError(file, lineno, field, msg) from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        msg = str(e)
        field, _, rest = msg.partition(": ")
        if rest and " " not in field:
            raise DataError(file, lineno, field, rest) from None
        raise DataError(file, lineno, None, msg) from None


def read_trajectories(path: str | Path, **kw) -> Iterator[Trajectory]:
    for _, _, traj in iter_records(path, Trajectory, **kw):
        yield traj


def _dump(record: Any) -> str:
    if isinstance(record, BaseModel):
        return record.model_dump_json(exclude_none=False)
    return json.dumps(record, ensure_ascii=False, default=str)


class ShardWriter:
    """Write records to ``<folder>/<prefix>-00000.jsonl[.gz]``, a new shard every ``shard_size``.

    Shards become visible (renamed from ``.tmp``) only when full or on ``close()``.
    """

    def __init__(self, folder: str | Path, prefix: str = "part", shard_size: int = 10_000,
                 compress: bool = False, start_index: int = 0):
        self.folder, self.prefix, self.shard_size = Path(folder), prefix, shard_size
        self.suffix = ".jsonl.gz" if compress else ".jsonl"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count, self.in_shard = start_index, 0, 0
        self.paths: list[Path] = []
        self._fh: IO[str] | None = None
        self._tmp: Path | None = None

    def _next_path(self) -> Path:
        return self.folder / f"{self.prefix}-{self.index:05d}{self.suffix}"

    def write(self, record: Any) -> None:
        if self._fh is None:
            self._tmp = self._next_path().with_name(self._next_path().name + ".tmp")
            self._fh = _open_write(self._tmp, self.suffix.endswith(".gz"))
        self._fh.write(_dump(record) + "\n")
        self.count += 1
        self.in_shard += 1
        if self.in_shard >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        final = self._next_path()
        os.replace(self._tmp, final)
        self.paths.append(final)
        self._fh, self._tmp, self.in_shard = None, None, 0
        self.index += 1

    def close(self) -> list[Path]:
        self._finish_shard()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._fh is not None:  # leave no shard that looks whole
            self._fh.close()
            self._tmp.unlink(missing_ok=True)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one file atomically; returns the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with _open_write(tmp, path.name.endswith(".gz")) as fh:
        for record in records:
            fh.write(_dump(record) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
