"""Sandbox init: pid 1 of fresh namespaces; builds a tiny root, forks the snippet, supervises it.

Started by ``sandbox.run_python`` as ``unshare --net --pid --mount --ipc --uts --fork
--kill-child <base python> -I -S _sandbox_init.py CONFIG_JSON``; stdin carries the user's code
(``code_bytes`` long) and then stays open as the caller's *lifeline*. Standard library only (it
runs with ``-I -S``, before and outside the project).

Pid 1 never runs the snippet itself: it forks it and stays as the supervisor, because every
process of a PID namespace dies with its pid 1, whatever session or process group it moved to
(``os.setsid()``, ``os.setpgid(0, 0)``, double forks). Pid 1 exits, taking all of them, when

- the snippet's main process exits (its wait status goes to the caller on ``status_fd``);
- the lifeline hits EOF: the caller closed it, or died (SIGTERM, SIGKILL, OOM) and the kernel
  closed it;
- its parent ``unshare`` dies (``--kill-child`` sets pid 1's parent-death signal).

The snippet's own parent-death signal (SIGKILL when pid 1 goes) is set *after* the uid change,
which clears it. Pid 1 installs no signal handler, so the snippet cannot signal it (the kernel
drops signals to a namespace's init that it has no handler for). Steps in the snippet's process:

0. pid 1 joins the call's memory cgroup (``cgroup``: its ``cgroup.procs``) when the caller made
   one, before anything else, so every process of the call is counted against ``memory_mb``.
1. a tmpfs becomes the new root (the host folder it sits on is invisible from outside: the mount
   namespace is private); only the interpreter, its shared libraries (``/usr``) and the
   dependency ``site-packages`` are bind-mounted in, read-only, nosuid; an empty file is bound
   over each ``hide`` path (the ``.pth`` files that name host folders). No /etc, /proc, /home,
   /root, /work, no project source.
2. ``/work`` is a second tmpfs owned by the sandbox uid (mode 0700), capped in size and in files
   (``max_files``): the fresh empty working folder. ``/dev`` holds only null, zero, random,
   urandom.
3. the root tmpfs is remounted read-only, ``chroot``, rlimits set (address space, processes,
   file size, CPU seconds, open files, no core dumps), groups cleared, setgid/setuid to an
   unprivileged uid (so RLIMIT_NPROC applies; it is ignored for root), no_new_privs,
4. parent-death signal SIGKILL, then exec ``python -u -S main.py`` (no site: 3x faster start;
   PYTHONPATH has the deps) with a scrubbed environment and stdin from /dev/null.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS, PR_CAPBSET_DROP = 1, 38, 28, 24

libc = ctypes.CDLL(None, use_errno=True)


def die(msg):
    sys.stderr.write(f"sandbox setup failed: {msg}\n")
    os._exit(125)


def mount(src, dst, fstype, flags, data=None):
    enc = (lambda s: s.encode() if s is not None else None)
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        die(f"mount {src} -> {dst}: {os.strerror(err)}")


def bind_ro(src, root, at=None, nodev=True):
    dst = root + (at or src)
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    mount(src, dst, None, MS_BIND | MS_REC)
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (MS_NODEV if nodev else 0))


def drop_capabilities():
    """User-namespace mode (caller not root): we stay uid 0 *inside* the namespace, so take every
    capability away for good (securebits: root gets none back on exec), else the snippet could
    chroot out of the tmpfs root."""
    if libc.prctl(PR_SET_SECUREBITS, 0x2F, 0, 0, 0) != 0:  # NOROOT, NO_SETUID_FIXUP, locked
        die("prctl(securebits)")
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            die(f"prctl(capbset_drop {cap})")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    if libc.capset(header, data) != 0:
        die("capset")


def read_code(n):
    """The first ``n`` bytes of stdin: the snippet (the rest of stdin is the lifeline)."""
    chunks, left = [], n
    while left:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            die(f"the caller sent {n - left} of {n} code bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def build_root(cfg, code):
    """The tmpfs root with the read-only binds, /dev and the /work folder holding main.py."""
    root, uid = cfg["root"], cfg["uid"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # belt and braces: nothing leaks to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID, "size=1m,mode=0755")
    for top in ("/bin", "/lib", "/lib64", "/sbin"):  # usrmerge symlinks, or real folders
        if os.path.islink(top):
            os.symlink(os.readlink(top), root + top)
        elif os.path.isdir(top):
            bind_ro(top, root)
    for src, at in [("/usr", "/usr"), *cfg["ro_paths"]]:
        if os.path.exists(src):
            bind_ro(src, root, at)
    empty = root + "/.hidden"  # bound over the site-packages files that name host paths: a
    open(empty, "w").close()   # file of this throw-away root, root's, so one mount call each
    for path in cfg["hide"]:
        if os.path.isfile(root + path):
            mount(empty, root + path, None, MS_BIND)
    os.makedirs(root + "/dev")
    for dev in ("null", "zero", "random", "urandom"):
        bind_ro("/dev/" + dev, root, nodev=False)  # only these four device nodes exist
    os.makedirs(root + "/work")
    mount("tmpfs", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['disk_mb']}m,nr_inodes={cfg['max_files']},mode=0700"
          + (f",uid={uid},gid={uid}" if cfg["drop_uid"] else ""))
    with open(root + "/work/main.py", "wb") as f:
        f.write(code)
    if cfg["drop_uid"]:
        os.chown(root + "/work/main.py", uid, uid)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def exec_snippet(cfg, supervisor):
    """In the forked child: chroot, limits, drop privileges, death signal, exec. Never returns."""
    uid = cfg["uid"]
    os.close(cfg["status_fd"])
    os.chroot(cfg["root"])
    os.chdir("/work")
    limits = {resource.RLIMIT_AS: cfg["memory_mb"] << 20, resource.RLIMIT_NPROC: cfg["max_procs"],
              resource.RLIMIT_FSIZE: cfg["file_mb"] << 20, resource.RLIMIT_CPU: cfg["cpu_s"],
              resource.RLIMIT_NOFILE: 256, resource.RLIMIT_CORE: 0}
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    if cfg["drop_uid"]:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() == 0 or os.geteuid() == 0:
            die("could not drop root")
    else:
        drop_capabilities()
    # after the uid change, which clears it; then make sure the supervisor did not already go
    if libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0 or os.getppid() != supervisor:
        die("prctl(pdeathsig)")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        die("prctl(no_new_privs)")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/work",
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": cfg["pythonpath"], "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        os.execve(cfg["python"], [cfg["python"], "-u", "-S", "main.py"], env)
    except OSError as e:
        die(f"exec {cfg['python']}: {e}")


def supervise(cfg, child):
    """Wait for the snippet or for the lifeline to break, whichever comes first; report the
    snippet's wait status on ``status_fd`` and return (pid 1 exiting kills the namespace)."""
    import select

    pidfd = os.pidfd_open(child)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(0, select.POLLIN | select.POLLHUP)
    while True:
        for fd, _ in poller.poll():
            if fd == pidfd:
                _, status = os.waitpid(child, 0)
                os.write(cfg["status_fd"], str(status).encode())
                return
            if not os.read(0, 4096):  # EOF: the caller is gone or gave up
                return


def join_cgroup(procs):
    """Move pid 1 into the call's memory cgroup first: all it forks is counted there."""
    try:
        with open(procs, "w") as f:
            f.write("0")  # 0: the writing process
    except OSError as e:
        die(f"joining the memory cgroup {procs}: {e}")


def main():
    cfg = json.loads(sys.argv[1])
    if cfg["cgroup"]:
        join_cgroup(cfg["cgroup"])
    build_root(cfg, read_code(cfg["code_bytes"]))
    supervisor = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            exec_snippet(cfg, supervisor)
        except Exception as e:  # noqa: BLE001 - any set-up error: the clear exit code
            die(f"{type(e).__name__}: {e}")
    supervise(cfg, child)
    os._exit(0)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # any setup error: a clear exit code, never a half-built sandbox
        die(f"{type(e).__name__}: {e}")
