"""Streaming JSONL shards (plain or ``.gz``) of trajectories or any pydantic model.

Reading is line by line, so a 10 GB shard never sits in memory. A bad line raises ``DataError``
naming the file, the line and the field at fault; with ``errors="skip"`` it is reported to the
``on_error`` callback (or collected) and reading goes on. What real files hold besides JSONL is
read too: a UTF-8 byte-order mark is dropped, and a JSON array (a ``.json`` file, or a
pretty-printed array where JSONL was expected, the way ADP publishes its samples) yields its
elements, each numbered by the line it starts on. A record nested deeper than Python can parse is
a bad record, never a ``RecursionError``.

Writing goes to a ``.tmp`` file beside the target and is renamed into place on close, so a killed writer never leaves
a shard that looks whole.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
import secrets
import textwrap
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ValidationError

from coaflow.errors import UserError, os_failure
from coaflow.schema.trajectory import Trajectory

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
DOCUMENT_SUFFIXES = (".json",)  # one JSON document: an array of records, or one record
BOM = b"\xef\xbb\xbf"
MAX_DEPTH = 200  # JSON nesting levels a record may have: pydantic serializes up to ~250
TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"
MAX_RECORD_BYTES = 64 << 20  # one record (a line, an array element) may be this large: a longer
# one is a bad record, and memory stays flat whatever the input (a gzip bomb, /dev/zero)
TOO_LARGE = f"record larger than {MAX_RECORD_BYTES >> 20} MiB"
CHUNK = 1 << 20  # bytes read at a time from a JSON document


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
    if not path.is_file():  # a device (/dev/zero), a fifo, a socket: it may never end
        raise DataError(path, None, None, "not a regular file")
    return [path]


def trajectory_source(path: str | Path) -> Path:
    """Where the trajectories of ``path`` are: in a folder whose ``result.json`` names its data
    output (a synthesize or gate stage folder, or their standalone ``--output``; ``Result.data``),
    that output, not the raw logs, failures or quarantine next to it; anything else is ``path``
    itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    from coaflow.contract import RESULT, resolve_output

    try:
        result = json.loads((path / RESULT).read_text())
        where = Path(resolve_output(result["outputs"][result["data"]], path))
    except (OSError, ValueError, KeyError, TypeError):
        return path
    return where if where.is_dir() else path


def _open_read(file: Path) -> IO[bytes]:
    return gzip.open(file, "rb") if file.name.endswith(".gz") else open(file, "rb")


def _is_document(file: Path) -> bool:
    """A ``.json`` file, or a file whose first line opens a JSON array that it does not close
    (a pretty-printed array given where JSONL is expected)."""
    if file.name.endswith(DOCUMENT_SUFFIXES):
        return True
    try:
        with _open_read(file) as fh:
            first = fh.readline(1 << 16).removeprefix(BOM)
            while not first.strip():
                if not first:
                    return False
                first = fh.readline(1 << 16)
            if not first.lstrip().startswith(b"["):
                return False
            if not first.endswith(b"\n"):  # a long line: read it, up to one record's size
                first += fh.readline(MAX_RECORD_BYTES)
                if not first.endswith(b"\n") and len(first) >= MAX_RECORD_BYTES:
                    return True  # "[" and no end in sight: an array, read as a stream
    except (OSError, EOFError, zlib.error):
        return False
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return True
    return False


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
    report = on_error or (lambda b: None)
    for file in shard_files(path):
        if _is_document(file):
            yield from _iter_document(file, parse, errors, report)
            continue
        with _open_read(file) as handle:
            lineno = 0
            while True:
                try:
                    raw = handle.readline(MAX_RECORD_BYTES + 1)
                    too_long = len(raw) > MAX_RECORD_BYTES
                    rest = raw if too_long else b"\n"
                    while rest and not rest.endswith(b"\n"):
                        rest = handle.readline(CHUNK)  # skip the rest of the line, unread
                except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip
                    bad = BadRecord(str(file), lineno + 1, f"unreadable: {e}")
                    if errors == "raise":
                        raise DataError(file, lineno + 1, None, bad.reason) from None
                    report(bad)
                    break
                if not raw:
                    break
                lineno += 1
                if too_long:
                    if errors == "raise":
                        raise DataError(file, lineno, None, TOO_LARGE)
                    report(BadRecord(str(file), lineno, TOO_LARGE))
                    continue
                if lineno == 1:
                    raw = raw.removeprefix(BOM)
                if not raw.strip():
                    continue
                try:
                    record = _parse_line(file, lineno, raw, parse)
                except DataError as e:
                    if errors == "raise":
                        raise
                    report(BadRecord(e.path, lineno, e.message, e.field))
                    continue
                yield str(file), lineno, record


class _Text:
    """A JSON document read as a stream: decoded text in a window ``buf`` that grows by ``CHUNK``
    bytes and drops what was consumed, with the line number of ``pos`` counted as it advances.
    Linear in the size of the document; memory is one chunk plus the largest record."""

    def __init__(self, fh: IO[bytes]):
        self.fh, self.decoder = fh, codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0  # line of buf[counted]
        self.first = True

    def fill(self) -> bool:
        """Read one more chunk (dropping what was consumed first); False at the end."""
        if self.eof:
            return False
        self.line_at(self.pos)
        self.buf, self.counted, self.pos = self.buf[self.pos:], 0, 0
        raw = self.fh.read(CHUNK)
        if self.first:
            raw, self.first = raw.removeprefix(BOM), False
        self.eof = not raw
        self.buf += self.decoder.decode(raw, final=self.eof)
        return not self.eof

    def line_at(self, pos: int) -> int:
        self.line += self.buf.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def skip_space(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.fill():
                return

    def peek(self) -> str:
        self.skip_space()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def value(self, decoder: json.JSONDecoder) -> tuple[Any, str]:
        """The next JSON value and its text, reading more while it may be cut off by the end of
        the window. Raises JSONDecodeError, RecursionError or DataError (too large)."""
        while True:
            try:
                obj, end = decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # a number may go on past the window
                    text, self.pos = self.buf[self.pos:end], end
                    return obj, text
            except json.JSONDecodeError:
                if self.eof:
                    raise
            if len(self.buf) - self.pos > MAX_RECORD_BYTES:
                raise DataError("", None, None, TOO_LARGE)
            self.fill()


def _iter_document(file: Path, parse, errors: str, report) -> Iterator[tuple[str, int, Any]]:
    """The records of one JSON document: each element of an array (numbered by the line it
    starts on), or the document itself when it is an object. The document is read as a stream
    and elements are decoded one by one, so a 1 GB array takes the memory of one element and
    time linear in its size; a bad element is reported at its own line and, when skipping,
    reading goes on after it."""
    def fail(line: int, message: str, field: str | None = None):
        if errors == "raise":
            raise DataError(file, line, field, message)
        report(BadRecord(str(file), line, message, field))

    def next_value(text: _Text, line: int):
        """(value, its text), or None once the failure is reported."""
        try:
            return text.value(decoder)
        except json.JSONDecodeError as e:
            fail(line + e.lineno - 1 - text.buf.count("\n", 0, text.pos),
                 f"invalid JSON ({e.msg})")
        except RecursionError:
            fail(line, TOO_DEEP)
        except DataError as e:
            fail(line, e.message)
        return None

    def element(text: _Text):
        """(line, record) of the value at the cursor, (line, None) for a bad record (reported),
        or None when the text cannot be read on."""
        line = text.line_at(text.pos)
        got = next_value(text, line)
        if got is None:
            return None
        try:
            return line, _parse_obj(file, line, got[0], parse, got[1])
        except DataError as e:
            fail(line, e.message, e.field)
            return line, None

    decoder = json.JSONDecoder()
    try:
        with _open_read(file) as fh:
            text = _Text(fh)
            first = text.peek()
            if not first:
                return
            if first != "[":  # one record
                got = element(text)
                if got is None:
                    return
                if got[1] is not None:
                    yield str(file), got[0], got[1]
                if text.peek():
                    fail(text.line_at(text.pos), "extra data after the JSON document")
                return
            text.pos += 1
            first_element = True
            while (c := text.peek()) != "]":
                if not c:
                    fail(text.line_at(text.pos), "invalid JSON array (no closing ']')")
                    return
                if not first_element:
                    if c != ",":
                        fail(text.line_at(text.pos), f"invalid JSON array (expected ',' or ']', "
                             f"got {c!r})")
                        return
                    text.pos += 1
                    text.peek()
                first_element = False
                got = element(text)
                if got is None:
                    return
                if got[1] is not None:
                    yield str(file), got[0], got[1]
            text.pos += 1
            if text.peek():
                fail(text.line_at(text.pos), "extra data after the JSON array")
    except UnicodeDecodeError as e:
        fail(1, f"invalid UTF-8 at byte {e.start}")
    except (OSError, EOFError, zlib.error) as e:
        fail(1, f"unreadable: {e}")


def _parse_line(file: Path, lineno: int, raw: bytes, parse) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(file, lineno, None, f"invalid UTF-8 at byte {e.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(file, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(file, lineno, None, TOO_DEEP) from None
    return _parse_obj(file, lineno, obj, parse, raw)


def too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` nests lists/dicts more than ``limit`` levels (walked without recursion).

    >>> too_deep([[[]]], 2), too_deep([[[]]], 3)
    (True, False)
    """
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _parse_obj(file: Path, lineno: int, obj: Any, parse, source: bytes | str) -> Any:
    """``parse(obj)`` with errors as ``DataError``; ``source`` is the record's JSON text: fewer
    brackets in it than ``MAX_DEPTH`` (the usual case, counted at C speed) cannot nest deeper."""
    opening = (b"[", b"{") if isinstance(source, bytes) else ("[", "{")
    if (source.count(opening[0]) + source.count(opening[1]) > MAX_DEPTH
            and isinstance(obj, (dict, list)) and too_deep(obj)):
        raise DataError(file, lineno, None, TOO_DEEP)
    if parse is None:
        return obj
    try:
        return parse(obj)
    except RecursionError:
        raise DataError(file, lineno, None, TOO_DEEP) from None
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


def _write_atomically(path: str | Path, write: Callable[[IO[str]], int]) -> int:
    """Run ``write(handle)`` into a temporary file beside ``path`` and rename it to ``path``;
    when it fails (a bad record half way, a full disk), remove the temporary file and any folder
    made for it: nothing half-written. Only a new path or a regular file is written: a device
    (``/dev/full``), a folder or a fifo is refused, never replaced by a file."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise UserError(f"{path}: {kind}; write to a new path or a regular file")
    made = [p for p in reversed(path.parents) if not p.exists()]
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"  # one per writer
        with _open_write(tmp, path.name.endswith(".gz")) as fh:
            n = write(fh)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise os_failure(e, str(path)) from None
        raise
    return n


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one file atomically; returns the number of records."""
    def write(fh: IO[str]) -> int:
        n = 0
        for record in records:
            fh.write(_dump(record) + "\n")
            n += 1
        return n

    return _write_atomically(path, write)


def write_json_array(path: str | Path, records: Iterable[Any]) -> int:
    """Write one pretty-printed JSON array (the shape ADP publishes, e.g. ``sample_std.json``,
    byte for byte what ``json.dump(records, f, indent=2)`` writes) atomically, one record at a
    time; returns the number of records."""
    def write(fh: IO[str]) -> int:
        n = 0
        fh.write("[")
        for record in records:
            obj = json.loads(_dump(record)) if isinstance(record, BaseModel) else record
            text = json.dumps(obj, indent=2, default=str)  # as json.dump(records, f, indent=2)
            fh.write(("," if n else "") + "\n" + textwrap.indent(text, "  "))
            n += 1
        fh.write("\n]\n" if n else "]\n")
        return n

    return _write_atomically(path, write)


def write_records(path: str | Path, records: Iterable[Any]) -> int:
    """A ``.json`` path gets a JSON array, anything else JSON lines (``.gz``: compressed)."""
    if Path(path).name.endswith(DOCUMENT_SUFFIXES):
        return write_json_array(path, records)
    return write_jsonl(path, records)
