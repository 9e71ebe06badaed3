"""Run untrusted Python source (model output) in a contained child process.

    from mopd.sandbox import run_untrusted
    res = run_untrusted("print(2 + 2)")      # SandboxResult(ok=True, stdout='4\\n', ...)

Every run gets resource limits (CPU time, address space, processes, file size, open files, no core
files), a wall-clock deadline after which its whole process group is killed, an empty environment,
a fresh temporary working directory that is deleted afterwards, and stdout/stderr capped by the
file-size limit. Two isolation layers sit on top, chosen once per process (``isolation()``):

* ``namespaces`` (when running as root with ``unshare`` permitted, e.g. in a container): the child
  runs in new network, PID and mount namespaces (``unshare --net --pid --mount --fork --kill-child``)
  as the unprivileged user ``nobody``. No network interface is up; every mount except the working
  directory is read-only; the parent's processes and their ``/proc/<pid>/environ`` are invisible;
  ``RLIMIT_NPROC`` applies (it does not for root); when the child's PID-namespace init dies, the
  kernel kills everything left in the namespace.
* ``audit`` (always on unless ``audit=False``): a Python audit hook installed in the child before
  the code runs refuses sockets, fork/exec/spawn/subprocess, ctypes, writes outside the working
  directory and reads of other processes' ``/proc`` entries. It is a tripwire inside the
  interpreter, not a security boundary (C extensions or clever object tricks can get past it); it is
  the only network/filesystem guard where namespaces are unavailable (``isolation() == "basic"``).

docs/reliability.md lists the guarantees and the test that shows each.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger("mopd")

NOBODY = 65534
_UNSHARE = ["--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc", "--propagation", "private"]


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within every limit
    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the wall-clock deadline
    reason: str  # "ok", "exit <n>", "cpu", "file_size", "signal <name>", "timeout", "error: ..."
    seconds: float
    pgid: int | None = None  # the run's process group (gone by the time the result exists)


# Runs inside the namespaces as root and PID 1 (or directly, in basic mode): locks the file system
# down, then forks the child, which sets the limits, drops to nobody and execs a fresh interpreter
# on BOOT; PID 1 reaps orphans and exits with the child's status (128 + signal if killed). argv:
# work, namespaces (0/1), uid (or -), python, prefix, audit (0/1), limits "NAME=n,...", BOOT.
_LAUNCHER = r"""
import os, sys
work, ns, uid, python, prefix, audit, limits, boot = sys.argv[1:9]
if ns == "1":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
    def mount(src, dst, flags, fstype=None, data=None):
        if libc.mount(src, dst.encode(), fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), "mount " + dst)
    mount(work.encode(), work, MS_BIND)
    # nobody must reach the interpreter: if an ancestor of its prefix is closed to others (pyenv
    # under /root), hide that ancestor under an empty tmpfs and bind the prefix alone back in.
    parts = prefix.split("/")
    closed = [d for d in ("/".join(parts[:i]) for i in range(2, len(parts) + 1)) if not os.stat(d).st_mode & 1]
    if closed:
        fd = os.open(prefix, os.O_PATH)
        mount(b"tmpfs", closed[0], 0, b"tmpfs", b"mode=755,size=64k")
        os.makedirs(prefix, 0o755, exist_ok=True)
        mount(("/proc/self/fd/%d" % fd).encode(), prefix, MS_BIND)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for p in points:
        if p != work:
            try:
                mount(None, p, MS_REMOUNT | MS_BIND | MS_RDONLY)
            except OSError:
                pass  # a mount hidden under another one; the one on top is what the child sees
pid = os.fork()
if pid == 0:
    import resource
    for item in limits.split(","):
        name, n = item.split("=")
        n = int(n)
        resource.setrlimit(getattr(resource, name), (n, n + 1 if name == "RLIMIT_CPU" else n))
    if uid != "-":
        os.setgroups([])
        os.setgid(int(uid))
        os.setuid(int(uid))
    os.chdir(work)
    os.execve(python, [python, "-I", "-S", "-c", boot, audit], {})
while True:  # PID 1 inherits every orphan; reap them all until the child itself is done
    done, status = os.waitpid(-1, 0)
    if done == pid:
        break
sys.exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
"""

# The child's first code: optionally install the audit hook, then run main.py from the cwd.
_BOOT = r"""
import os, sys
def _install():
    work = os.getcwd() + os.sep
    realpath, join, fspath = os.path.realpath, os.path.join, os.fspath
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    DENY = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
            "subprocess.", "ctypes.", "os.kill", "os.killpg", "pty.", "os.setuid", "os.chroot")
    MUTATE = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.link",
              "os.symlink", "os.truncate", "os.utime", "os.mkfifo", "os.mknod"}
    def inside(p):
        try:
            p = fspath(p)
        except TypeError:
            return True  # an int fd: opened already, checked then
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        return (realpath(join(work, p)) + os.sep).startswith(work)
    def hook(event, args):
        if event.startswith(DENY):
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE
            if writes and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory")
            p = path if isinstance(path, str) else ""
            if p.startswith("/proc/") and not p.startswith(("/proc/self/", "/proc/thread-self/")):
                raise PermissionError("sandbox: reading other processes is not allowed")
        elif event in MUTATE and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError("sandbox: " + event + " outside the working directory")
    sys.addaudithook(hook)
if sys.argv[1] == "1":
    _install()
del _install
with open("main.py") as f:
    src = f.read()
exec(compile(src, "main.py", "exec"), {"__name__": "__main__"})
"""


def _python() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _limits(cpu_s: float, memory_mb: int, max_procs: int, max_file_mb: int, max_files: int) -> dict:
    return {
        "RLIMIT_CPU": max(1, int(round(cpu_s))),  # hard = soft + 1: SIGXCPU first, then SIGKILL
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_NPROC": max_procs,
        "RLIMIT_FSIZE": max_file_mb << 20,
        "RLIMIT_NOFILE": max_files,
        "RLIMIT_CORE": 0,
    }


def _reason(rc: int | None, timed_out: bool) -> str:
    if timed_out or rc is None:  # rc is None only when the run timed out
        return "timeout"
    if rc == 0:
        return "ok"
    # Under unshare the child's death by signal N shows up as exit status 128 + N.
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU or sig == signal.SIGKILL:
        return "cpu" if sig == signal.SIGXCPU else "signal SIGKILL"
    if sig == signal.SIGXFSZ:
        return "file_size"
    if sig:
        return f"signal {signal.Signals(sig).name}" if sig in signal.Signals._value2member_map_ else f"signal {sig}"
    return f"exit {rc}"


def live_group_members(pgid: int) -> list:
    """PIDs of the process group ``pgid`` that are not zombies (a zombie has freed everything; an
    orphaned one waits for init to reap it, which may take a while)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                pids.append(int(name))
    return pids


def _kill_group(proc: subprocess.Popen, wait_s: float = 2.0) -> None:
    """SIGKILL the child's process group, reap the child, and wait (bounded) until no live
    process of the group is left."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        except PermissionError:  # only zombies of another uid left
            pass
        proc.poll()  # reap our own child so its zombie does not keep the group alive
        if not live_group_members(proc.pid) or time.monotonic() > deadline:
            break
        time.sleep(0.002)
    proc.wait()


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def run_untrusted(
    code: str,
    *,
    cpu_s: float = 2.0,
    wall_s: float = 5.0,
    memory_mb: int = 512,
    max_procs: int = 16,
    max_file_mb: int = 4,
    max_files: int = 64,
    audit: bool = True,
    namespaces: bool | None = None,
) -> SandboxResult:
    """Run ``code`` (Python source) contained; never raises for anything the code does.

    ``namespaces=None`` uses them where available (``isolation()``); True requires them.
    """
    use_ns = isolation() == "namespaces" if namespaces is None else namespaces
    if use_ns and not _namespaces_work():
        raise RuntimeError("sandbox: namespaces requested but unavailable (needs root and unshare)")
    return _run(code, use_ns, audit, _limits(cpu_s, memory_mb, max_procs, max_file_mb, max_files), wall_s)


def _run(code: str, use_ns: bool, audit: bool, limits: dict, wall_s: float) -> SandboxResult:
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="mopd-sandbox-")
    io_dir = tempfile.mkdtemp(prefix="mopd-sandbox-io-")  # stays owned by us, mode 0700
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        drop = use_ns and os.geteuid() == 0
        if drop:
            os.chown(work, NOBODY, NOBODY)
            os.chown(os.path.join(work, "main.py"), NOBODY, NOBODY)
        lims = ",".join(f"{k}={v}" for k, v in limits.items())
        uid = str(NOBODY) if drop else "-"
        argv = [
            _python(),
            "-I",
            "-S",
            "-c",
            _LAUNCHER,
            os.path.realpath(work),
            str(int(use_ns)),
            uid,
            _python(),
            os.path.realpath(sys.base_prefix),
            str(int(audit)),
            lims,
            _BOOT,
        ]
        if use_ns:
            argv = [shutil.which("unshare") or "unshare", *_UNSHARE, *argv]
        out_path, err_path = os.path.join(io_dir, "out"), os.path.join(io_dir, "err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={},
                cwd=work,
                start_new_session=True,
                close_fds=True,
            )
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=wall_s)
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
        _kill_group(proc)  # whatever it left behind, finished or not
        cap = limits["RLIMIT_FSIZE"]
        return SandboxResult(
            rc == 0 and not timed_out,
            _read(out_path, cap),
            _read(err_path, cap),
            rc,
            _reason(rc, timed_out),
            time.monotonic() - t0,
            proc.pid,
        )
    except OSError as e:  # we could not start it: a failure of the run, never of the caller
        return SandboxResult(False, "", "", None, f"error: {e}", time.monotonic() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


_ISOLATION: str | None = None


def _namespaces_work() -> bool:
    return isolation() == "namespaces"


def isolation() -> str:
    """``"namespaces"`` if a probe run inside them works here, else ``"basic"`` (limits + audit
    hook only, logged once as a warning). Decided once per process."""
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = "basic"
        if os.geteuid() == 0 and shutil.which("unshare"):
            probe = _run("print('ok')", True, True, _limits(2, 512, 16, 1, 64), 10.0)
            if probe.stdout == "ok\n":
                _ISOLATION = "namespaces"
            else:
                log.warning(
                    "sandbox: namespaces unavailable (%s %s); using limits + audit hook only",
                    probe.reason,
                    probe.stderr.strip()[-200:],
                )
        else:
            log.warning("sandbox: not root or no unshare; using limits + audit hook only")
    return _ISOLATION
