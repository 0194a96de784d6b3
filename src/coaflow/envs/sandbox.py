"""Run untrusted Python (the agents' ``python`` tool) in a contained, throw-away process.

How it is contained (Linux; works as root, which is how these machines and CI run):

- **Separate process in fresh namespaces**: ``unshare --net --pid --mount --ipc --uts --fork
  --kill-child`` starts ``_sandbox_init.py`` as pid 1 of a new PID namespace; it forks the
  snippet and supervises it. When pid 1 dies every process in the namespace dies with it, so
  nothing a snippet forks outlives the call, not even after ``os.setsid()`` or a double fork.
  Pid 1 goes when the snippet's main process exits, at the timeout (the caller kills it), and
  when the caller itself dies: the caller holds the write end of pid 1's stdin (the *lifeline*),
  which the kernel closes with the caller, however it dies. The throw-away folder is removed in
  a ``finally``; one left by a caller killed outright is removed by the next call.
- **No network**: the new network namespace has only a loopback device, and it is down; even
  ``127.0.0.1`` is unreachable ("Network is unreachable").
- **No files outside a fresh folder**: the init mounts a private tmpfs as the new root, binds in
  read-only only ``/usr`` (shared libraries), the Python installation and the dependencies'
  ``site-packages`` (so numpy/sympy work), then ``chroot``s. ``/etc``, ``/proc``, ``/root``,
  ``/home``, the project tree and the caller's temp files simply do not exist inside. The working
  folder ``/work`` is a new, empty, size-capped tmpfs (``disk_mb``) and the only writable place.
- **Unprivileged**: after the chroot the process drops to a fresh numeric uid/gid (no groups,
  ``no_new_privs``), so it cannot remount, ``chroot`` out or write the read-only binds, and
  RLIMIT_NPROC is enforced (the kernel ignores it for root). A random uid per call keeps
  concurrent sandboxes from sharing the process budget.
- **Limits**: wall time (the caller kills the whole process group, then the namespace dies),
  RLIMIT_AS (``memory_mb``), RLIMIT_NPROC (``max_procs``: a fork bomb gets EAGAIN), RLIMIT_CPU,
  RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps. Output is read by the caller up to ``max_output``
  bytes per stream; past that the process is killed and the result says "output truncated".
- **Scrubbed environment**: the snippet gets a fixed environment (PATH, HOME=/work, LANG, ...),
  never the caller's variables; it also cannot read ``/proc/<pid>/environ`` (no /proc inside).

Honest limits of the approach: RLIMIT_AS bounds virtual memory per process, not the sum over
processes (with ``max_procs`` it bounds the total to ``memory_mb * max_procs``); there is no
cgroup, so CPU share is not capped (only CPU seconds and wall time); the syscall surface is not
filtered (no seccomp), so a kernel bug could still be an escape. Callers that are not root get
the same layout through a user namespace (``--map-root-user``, needs unprivileged user
namespaces enabled); the snippet is then uid 0 inside it with every capability dropped
(securebits locked), and RLIMIT_NPROC counts against the caller's own uid. Where no namespace can
be created, ``run_python`` returns ``error="sandbox unavailable: ..."`` and runs nothing: it
never falls back to running code unsandboxed.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INIT = Path(__file__).with_name("_sandbox_init.py")
SETUP_FAILED = 125
MAX_CODE_BYTES = 8 << 20  # a snippet larger than this is refused before anything starts
TMP_PREFIX = "coaflow-sbx-"


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None
    error: str | None = None  # the limit that was hit: timeout, memory, output truncated, ...
    wall_s: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None


def _python_paths() -> tuple[str, list[tuple[str, str]], str]:
    """(interpreter, read-only (host path, sandbox path) binds, PYTHONPATH) for the sandbox.

    The base interpreter keeps its own path; the venv's site-packages (inside the project tree)
    is bound at /opt/site-packages-N, so the project path itself never appears inside.
    """
    prefix = os.path.realpath(sys.base_prefix)
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    site = sorted({os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    site = [p for p in site if os.path.isdir(p) and not p.startswith(prefix + os.sep)]
    binds = [(prefix, prefix)] + [(p, f"/opt/site-packages-{i}") for i, p in enumerate(site)]
    return python, binds, ":".join(at for _, at in binds[1:])


def _classify(stdout: str, stderr: str, exit_code: int | None) -> str | None:
    """Name the limit a finished (not killed by us) snippet ran into, from its exit and stderr."""
    tail = stderr[-4000:]
    if exit_code == -signal.SIGXCPU:
        return "cpu time"
    if exit_code == -signal.SIGXFSZ or "File too large" in tail:
        return "file size"
    if "MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail:
        return "memory"
    if "Resource temporarily unavailable" in tail and ("fork" in tail or "BlockingIOError" in tail):
        return "process limit"
    if "No space left on device" in tail:
        return "disk full"
    if "Network is unreachable" in tail or "Temporary failure in name resolution" in tail:
        return "network"
    return None


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output: int = 8192,
               max_procs: int = 32, disk_mb: int = 64, file_mb: int = 16,
               cpu_s: int | None = None) -> SandboxResult:
    """Run ``code`` in the sandbox and return what it printed; never raises, never hangs.

    The caller waits at most ``timeout_s`` (plus process teardown); a snippet that runs longer is
    killed with its whole namespace and the result's ``error`` is ``"timeout"``. Code over
    ``MAX_CODE_BYTES`` is refused (``error="code too large (N bytes, limit M)"``).
    """
    start = time.monotonic()
    source = code.encode("utf-8", "replace")
    if len(source) > MAX_CODE_BYTES:
        return SandboxResult("", "", None, f"code too large ({len(source)} bytes, limit "
                             f"{MAX_CODE_BYTES})")
    unshare = shutil.which("unshare")
    if unshare is None:
        return SandboxResult("", "", None, "sandbox unavailable: `unshare` (util-linux) not found")
    python, ro_paths, pythonpath = _python_paths()
    _remove_stale_folders()
    root = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
    try:
        return _run(source, root, unshare, python, ro_paths, pythonpath, start, timeout_s,
                    max_output, dict(memory_mb=int(memory_mb), max_procs=int(max_procs),
                                     disk_mb=int(disk_mb), file_mb=int(file_mb),
                                     cpu_s=int(cpu_s or max(1, int(timeout_s) + 1))))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _remove_stale_folders() -> None:
    """Remove the throw-away folders of callers that died before their ``finally`` ran."""
    for folder in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        pid = folder.name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _run(source: bytes, root: str, unshare: str, python: str, ro_paths, pythonpath: str,
         start: float, timeout_s: float, max_output: int, limits: dict) -> SandboxResult:
    is_root = os.geteuid() == 0
    uid = random.randrange(200_000, 260_000)
    status_r, status_w = os.pipe()
    cfg = {"root": root, "uid": uid, "drop_uid": is_root, "ro_paths": ro_paths,
           "pythonpath": pythonpath, "python": python, "code_bytes": len(source),
           "status_fd": status_w, **limits}
    argv = [unshare, *([] if is_root else ["--user", "--map-root-user"]),
            "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child",
            python, "-I", "-S", str(INIT), json.dumps(cfg)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, env={},
                                cwd=root, close_fds=True, pass_fds=(status_w,))
    except OSError as e:
        os.close(status_r)
        os.close(status_w)
        return SandboxResult("", "", None, f"sandbox unavailable: {e}")
    os.close(status_w)
    try:
        try:
            proc.stdin.write(source)  # the code; stdin then stays open: the lifeline
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        out, err, error = _collect(proc, start + timeout_s, max_output)
    finally:
        if proc.poll() is None:  # interrupted half way (KeyboardInterrupt): take it down
            _kill(proc)
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        os.set_blocking(status_r, False)
        try:
            status = os.read(status_r, 64)  # the snippet's wait status, from pid 1
        except BlockingIOError:
            status = b""
        os.close(status_r)
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    code_ = os.waitstatus_to_exitcode(int(status)) if status else proc.returncode
    if error is None and code_ == SETUP_FAILED and "sandbox setup failed" in stderr:
        error = "sandbox unavailable: " + stderr.strip().splitlines()[-1]
    elif error is None and code_ != 0 and stderr.startswith("unshare:"):
        error = "sandbox unavailable: " + stderr.strip().splitlines()[0]
    if error is None and code_ != 0:
        error = _classify(stdout, stderr, code_)
    return SandboxResult(stdout, stderr, code_, error, round(time.monotonic() - start, 4),
                         {"uid": uid if is_root else os.getuid()})


def _collect(proc: subprocess.Popen, deadline: float, max_output: int):
    """Read both pipes until EOF, the deadline, or too much output; kill the group if needed."""
    fds = (proc.stdout.fileno(), proc.stderr.fileno())
    bufs = {fd: bytearray() for fd in fds}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    error = None
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                error = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                buf += chunk[: max_output + 1 - len(buf)] if len(buf) <= max_output else b""
                if len(buf) > max_output:
                    error = "output truncated"
                    break
            if error:
                break
    finally:
        sel.close()
    if error:
        _kill(proc)
    else:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        except subprocess.TimeoutExpired:
            error = "timeout"
            _kill(proc)
    proc.stdout.close()
    proc.stderr.close()
    out, err = (bytes(bufs[fd][:max_output]) for fd in fds)
    return out, err, error


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the session (unshare and pid 1 of the namespace); the kernel kills the rest."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - the kernel did not reap in time
        proc.kill()


def format_observation(result: SandboxResult) -> str:
    """The text an agent sees after a ``python`` call: stdout, stderr and any violated limit.

    >>> format_observation(SandboxResult("42\\n", "", 0))
    '42'
    >>> format_observation(SandboxResult("", "", None, "timeout"))
    'Error: timeout: the code ran past its time limit and was stopped.\\n(no output)'
    """
    parts = []
    if result.error:
        why = {"timeout": "the code ran past its time limit and was stopped",
               "memory": "the code ran out of memory (memory limit reached)",
               "output truncated": "the output was too long; it was cut and the code stopped",
               "process limit": "too many processes (process limit reached)",
               "network": "there is no network access in the sandbox",
               "file size": "a file grew past the file size limit",
               "disk full": "the working folder is full",
               "cpu time": "the code used up its CPU time"}.get(result.error, result.error)
        parts.append(f"Error: {result.error}: {why}.")
    out, err = result.stdout.rstrip(), result.stderr.rstrip()
    if out:
        parts.append(out)
    if err:
        parts.append(("stderr:\n" if out else "") + err)
    if not out and not err:
        parts.append("(no output)" if result.error or result.exit_code == 0
                     else f"(no output, exit code {result.exit_code})")
    if not result.error and result.exit_code not in (0, None) and err and not out:
        parts.insert(0, "Error:")
        return parts[0] + " " + "\n".join(parts[1:])
    return "\n".join(parts)
