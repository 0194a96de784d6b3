"""Digests of what a result depends on: a JSON value, source files, files and folders a config
names, and coaflow's own code. The stage cache key (``runner.cache_key``) and evaluate's row cache
are built from them: a result is reused only when everything it was made from is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from coaflow.errors import PipelineError


def digest(obj: Any) -> str:
    """A short sha256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(root: Path) -> str:
    """A digest of the source files under ``root`` (.py, .yaml, .json; not bytecode)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in {".py", ".yaml", ".json"}:
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def code_digest() -> str:
    """coaflow's own source (``source_digest`` of the package, once per process): part of every
    cache key, so a stage folder made by other code is never reused. Without it a changed teacher
    or tokenizer silently reused the old trajectories or model."""
    return source_digest(Path(__file__).parent)


_FILE_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a file is read once


def file_digest(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def path_digest(value: Any) -> Any:
    """The contents of what a path-valued config key names: a file's sha256, a folder's digest
    over its files (relative name and contents), None for a value that is not a local path (a
    hub id, 'tiny', a URL); a list of paths digests each. Changing a file a stage reads changes
    its cache key, as a changed config value does."""
    if isinstance(value, (list, tuple)):
        return [path_digest(v) for v in value]
    if not isinstance(value, str) or not value or "://" in value:
        return None
    p = Path(value).expanduser()
    try:
        if p.is_file():
            return file_digest(p)
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                h.update(f.relative_to(p).as_posix().encode() + b"\0" + file_digest(f).encode())
            return h.hexdigest()
    except OSError as e:
        raise PipelineError(f"{value}: cannot read it for the cache key ({e.strerror})") from None
    return None
