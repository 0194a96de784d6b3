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
  ``/home``, the project tree and the caller's temp files simply do not exist inside; the
  ``site-packages`` files that name host paths (``*.pth``, ``*.egg-link``, ``direct_url.json``:
  an editable install's source folder) read as empty. The working folder ``/work`` is a new,
  empty tmpfs capped in size (``disk_mb``) and in files (``disk_mb * FILES_PER_MB``: each empty
  file costs kernel memory that the size cap does not count), and the only writable place.
- **Unprivileged**: after the chroot the process drops to a fresh numeric uid/gid (no groups,
  ``no_new_privs``), so it cannot remount, ``chroot`` out or write the read-only binds, and
  RLIMIT_NPROC is enforced (the kernel ignores it for root). A random uid per call keeps
  concurrent sandboxes from sharing the process budget.
- **Memory per call**: ``memory_mb`` caps the call, all its processes together: pid 1 joins a
  memory cgroup made for the call (v2, or v1's memory controller) before it builds anything,
  so the kernel's OOM killer acts inside the call only (``error="memory"``). Where no cgroup
  can be made (no write access, a user namespace), the caller adds up the resident memory of
  the call's processes every 50 ms and kills the call past ``memory_mb``.
- **Limits**: wall time (the caller kills the whole process group, then the namespace dies),
  RLIMIT_AS (``memory_mb``, per process), RLIMIT_NPROC (``max_procs``: a fork bomb gets EAGAIN), RLIMIT_CPU,
  RLIMIT_FSIZE, RLIMIT_NOFILE, no core dumps. Output is read by the caller up to ``max_output``
  bytes per stream; past that the process is killed and the result says "output truncated".
- **Scrubbed environment**: the snippet gets a fixed environment (PATH, HOME=/work, LANG, ...),
  never the caller's variables; it also cannot read ``/proc/<pid>/environ`` (no /proc inside).

Honest limits of the approach: without a cgroup the memory of a call is counted by sampling,
so a burst shorter than 50 ms can pass the cap (RLIMIT_AS still bounds each process); CPU share
is not capped (only CPU seconds and wall time); the syscall surface is not
filtered (no seccomp), so a kernel bug could still be an escape. Callers that are not root get
the same layout through a user namespace (``--map-root-user``, needs unprivileged user
namespaces enabled); the snippet is then uid 0 inside it with every capability dropped
(securebits locked), and RLIMIT_NPROC counts against the caller's own uid. Where no namespace can
be created, ``run_python`` returns ``error="sandbox unavailable: ..."`` and runs nothing: it
never falls back to running code unsandboxed.
"""

from __future__ import annotations

import functools
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
TMP_PREFIX = "coaflow-sbx-"  # the throw-away folders and the per-call cgroups
# Files (inodes) the /work tmpfs holds per MB of ``disk_mb``: an empty file costs ~850 bytes of
# kernel memory that the size cap does not count (measured: 650,000 files in 4.8 s took +550 MB)
FILES_PER_MB = 256
SAMPLE_S = 0.05  # how often the caller adds up a call's memory where there is no cgroup


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


def _hidden_files(binds: list[tuple[str, str]]) -> list[str]:
    """The files of the bound ``site-packages`` that name host paths, as the sandbox sees them:
    ``.pth`` files (an editable install's is the project's ``src`` folder), ``.egg-link`` files
    and ``direct_url.json`` of a package installed from a local folder. Listed again only when
    a folder changed (an install): listing takes ~4 ms, a call ~100."""
    stamps = []
    for host, _ in binds[1:]:
        try:
            stamps.append(os.stat(host).st_mtime_ns)
        except OSError:
            stamps.append(None)
    return list(_list_hidden(tuple(binds), tuple(stamps)))


@functools.lru_cache(maxsize=4)
def _list_hidden(binds: tuple, stamps: tuple) -> tuple[str, ...]:
    hidden = []
    for host, at in binds[1:]:
        try:
            names = os.listdir(host)
        except OSError:
            continue
        for name in names:
            if name.endswith((".pth", ".egg-link")) or name.startswith("__editable__"):
                lines = _read(f"{host}/{name}").splitlines()  # a .pth of imports names no path
                if any("/" in x for x in lines if not x.startswith(("import ", "#"))):
                    hidden.append(f"{at}/{name}")
            elif name.endswith(".dist-info") and "file:" in _read(f"{host}/{name}/direct_url.json"):
                hidden.append(f"{at}/{name}/direct_url.json")
    return tuple(hidden)


@functools.cache
def _cgroup_base() -> tuple[str, str] | None:
    """``(folder, version)`` of this process's own memory cgroup, where one folder per call is
    made ("2": the unified hierarchy, "1": v1's memory controller); None where the hierarchy is
    not there or not writable. Found once per process."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        if fstype == "cgroup" and "memory" in options:
            version, mount = "1", fields[4]
            path = next((x.split(":", 2)[2] for x in own
                         if "memory" in x.split(":", 2)[1].split(",")), None)
        elif fstype == "cgroup2":
            version, mount = "2", fields[4]
            path = next((x.split(":", 2)[2] for x in own if x.startswith("0::")), None)
        else:
            continue
        folder = os.path.join(mount, (path or "/").lstrip("/"))
        if path is not None and os.access(folder, os.W_OK) and (
                version == "1" or "memory" in _read(f"{folder}/cgroup.subtree_control").split()):
            return folder, version
    return None


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _make_cgroup(memory_mb: int) -> tuple[str, str] | None:
    """A new cgroup capping a call's memory at ``memory_mb`` (swap too), or None."""
    base = _cgroup_base()
    if base is None:
        return None
    root, version = base
    folder = f"{root}/{TMP_PREFIX}{os.getpid()}-{random.getrandbits(32):08x}"
    limit = str(memory_mb << 20)
    try:
        os.mkdir(folder)
        if version == "2":
            files = [("memory.max", limit), ("memory.swap.max", "0")]
        else:
            files = [("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit)]
        for name, value in files:
            if os.path.exists(f"{folder}/{name}"):
                with open(f"{folder}/{name}", "w") as fh:
                    fh.write(value)
        if not os.path.exists(f"{folder}/{files[0][0]}"):
            raise OSError("no memory controller")
    except OSError:
        _remove_cgroup(folder)
        return None
    return folder, version


def _oom_killed(cgroup: tuple[str, str]) -> bool:
    folder, version = cgroup
    text = _read(f"{folder}/{'memory.events' if version == '2' else 'memory.oom_control'}")
    kills = [int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")]
    return bool(kills and kills[0]) or (version == "1" and _read(f"{folder}/memory.failcnt")
                                        .strip() not in ("", "0"))


def _remove_cgroup(folder: str) -> None:
    """rmdir the call's cgroup; its processes may still be exiting for a moment."""
    for _ in range(200):
        try:
            os.rmdir(folder)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)


def _call_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (the call's processes)."""
    total, todo, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        total += int((_read(f"/proc/{p}/statm").split() or ["0", "0"])[1]) * page
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            todo += [int(c) for c in _read(f"/proc/{p}/task/{t}/children").split()]
    return total


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
    """Remove the throw-away folders and cgroups of callers that died before their ``finally``
    ran."""
    base = _cgroup_base()
    cgroups = list(Path(base[0]).glob(f"{TMP_PREFIX}*-*")) if base else []
    for folder in list(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*")) + cgroups:
        pid = folder.name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if folder in cgroups:
                _remove_cgroup(str(folder))
            else:
                shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _run(source: bytes, root: str, unshare: str, python: str, ro_paths, pythonpath: str,
         start: float, timeout_s: float, max_output: int, limits: dict) -> SandboxResult:
    is_root = os.geteuid() == 0
    uid = random.randrange(200_000, 260_000)
    cgroup = _make_cgroup(limits["memory_mb"]) if is_root else None
    try:
        return _run_in(source, root, unshare, python, ro_paths, pythonpath, start, timeout_s,
                       max_output, limits, is_root, uid, cgroup)
    finally:
        if cgroup is not None:
            _remove_cgroup(cgroup[0])


def _run_in(source: bytes, root: str, unshare: str, python: str, ro_paths, pythonpath: str,
            start: float, timeout_s: float, max_output: int, limits: dict, is_root: bool,
            uid: int, cgroup: tuple[str, str] | None) -> SandboxResult:
    status_r, status_w = os.pipe()
    cfg = {"root": root, "uid": uid, "drop_uid": is_root, "ro_paths": ro_paths,
           "pythonpath": pythonpath, "python": python, "code_bytes": len(source),
           "status_fd": status_w, "hide": _hidden_files(ro_paths),
           "max_files": max(1024, limits["disk_mb"] * FILES_PER_MB),
           "cgroup": f"{cgroup[0]}/cgroup.procs" if cgroup else None, **limits}
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
        out, err, error = _collect(proc, start + timeout_s, max_output,
                                   None if cgroup else limits["memory_mb"] << 20)
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
    if error is None and cgroup is not None and _oom_killed(cgroup):
        error = "memory"  # the kernel killed a process of the call at the call's cap
    if error is None and code_ != 0:
        error = _classify(stdout, stderr, code_)
    return SandboxResult(stdout, stderr, code_, error, round(time.monotonic() - start, 4),
                         {"uid": uid if is_root else os.getuid()})


def _collect(proc: subprocess.Popen, deadline: float, max_output: int,
             memory_bytes: int | None = None):
    """Read both pipes until EOF, the deadline, or too much output; kill the group if needed.
    With ``memory_bytes`` (no cgroup), also past that much resident memory in the call."""
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
            if memory_bytes is not None and _call_rss(proc.pid) > memory_bytes:
                error = "memory"
                break
            for key, _ in sel.select(timeout=min(left, 0.5 if memory_bytes is None
                                                  else SAMPLE_S)):
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
