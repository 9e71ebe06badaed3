"""The sandbox that runs model output (``mopd.sandbox``) and the code domain's executing verifier.

Each attack is run three ways where it applies: through the verifier (scores 0.0, then a correct
answer still scores 1.0: the run goes on), against a kernel layer alone (audit hook off; the tests
marked ``KERNEL`` run once per layer that works here: our namespaces + minimal root as nobody, and
bubblewrap) and against the audit hook alone (no namespaces). docs/reliability.md maps each
guarantee to these tests.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest

from features import require
from mopd import sandbox
from mopd.domains import code, get_generator, get_verifier
from mopd.sandbox import live_group_members, run_untrusted

# Skipped where the layer does not work here, failed where MOPD_REQUIRE names it (tests/features.py).
needs_ns = pytest.mark.requires("sandbox")
needs_bwrap = pytest.mark.requires("bwrap")
# The kernel layers: our own namespaces (root + unshare) and bubblewrap, each where it works.
KERNEL = pytest.mark.parametrize(
    "kernel", [pytest.param("namespaces", marks=needs_ns), pytest.param("bwrap", marks=needs_bwrap)]
)
FAST = dict(cpu_s=1.0, wall_s=5.0, memory_mb=256, max_procs=8, max_file_mb=1)


def _stmt(src: str) -> str:
    """A 'response' that breaks out of ``print((...))`` and runs statements: what an adversarial
    model could emit."""
    return f"0))\n{src}\nprint((0"


@pytest.fixture
def row():
    return code.generate_exec(random.Random(0), 1, "train")[0]


@pytest.fixture(autouse=True)
def fast_limits(monkeypatch):
    monkeypatch.setattr(code, "EXEC_LIMITS", dict(FAST))


@pytest.fixture(autouse=True)
def unisolated_allowed(monkeypatch):
    """The attack tests also run where namespaces are unavailable (as the audit layer's tests);
    the refusal itself is tested with the flag off."""
    monkeypatch.setattr(sandbox, "_ALLOW_UNISOLATED", True)


def _contained(res, t_max: float) -> None:
    assert not res.ok and res.seconds < t_max, res
    assert live_group_members(res.pgid) == [], "processes of the run outlived it"


def _scores_zero_then_one(row, response: str) -> None:
    verify = get_verifier("code").verify
    t0 = time.monotonic()
    assert verify(row, response) == 0.0
    assert time.monotonic() - t0 < 8
    assert verify(row, row.meta["answer"]) == 1.0  # the run goes on


# ---------------------------------------------------------------------- the verifier


def test_exec_verifier_runs_the_response(row):
    verify = get_verifier("code").verify
    assert row.meta["check"] == "exec"
    assert verify(row, row.meta["answer"]) == 1.0
    assert verify(row, repr(row.meta["value"])) == 1.0  # any expression with the right value
    assert verify(row, "'nope'") == 0.0 and verify(row, "syntax error(") == 0.0


def test_exec_rows_route_to_the_code_teacher_and_plain_rows_keep_exact_match():
    rows = code.generate_exec(random.Random(1), 20, "train")
    assert {r.domain for r in rows} == {"code"} and all(r.prompt.startswith("make ") for r in rows)
    plain = get_generator("code_l2").generate(random.Random(0), 3, "train")[0]
    assert "check" not in plain.meta
    assert get_verifier("code").verify(plain, plain.meta["answer"]) == 1.0
    assert get_verifier("code").verify(plain, "0))\nprint((" + repr(plain.meta["answer"])) == 0.0  # not executed


def test_sandbox_failure_scores_zero_and_is_counted(row, monkeypatch):
    """A verifier that raises would stop the loop's reward/eval phase; it must score 0 instead."""

    def broken(*a, **k):
        raise RuntimeError("no sandbox today")

    monkeypatch.setattr(sandbox, "run_untrusted", broken)
    before = code.EXEC_OUTCOMES["error: RuntimeError"]
    assert get_verifier("code").verify(row, row.meta["answer"]) == 0.0
    assert code.EXEC_OUTCOMES["error: RuntimeError"] == before + 1


def test_evaluate_survives_hostile_responses(row):
    """mopd.loop.evaluate calls the verifier per response: hostile ones score 0, the rest count."""
    from mopd.loop import evaluate

    rows = [row, row]
    batch = SimpleNamespace(
        rows=rows, responses=[_stmt("import os\nos.system('id')"), row.meta["answer"]], episodes=None
    )
    rollout = SimpleNamespace(generate=lambda rows, n, seed, greedy=False: batch)
    assert evaluate(rollout, rows) == {"eval/code/accuracy": 0.5}


# ---------------------------------------------------------------------- attacks


FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"


def test_fork_bomb_verifier(row):
    _scores_zero_then_one(row, _stmt("import os\nwhile True:\n    os.fork()"))


@needs_ns
def test_fork_bomb_kernel_layer():
    """RLIMIT_NPROC (enforced once the child is nobody) caps it; the wall clock ends it."""
    res = run_untrusted(FORK_BOMB.replace("pass", "print('refused', flush=True); break"), audit=False, **FAST)
    assert "refused" in res.stdout  # fork failed with EAGAIN at the process limit
    res = run_untrusted(FORK_BOMB, audit=False, **{**FAST, "wall_s": 1.0})
    assert res.reason == "timeout"
    _contained(res, 4.0)


def test_fork_bomb_audit_layer():
    """Without namespaces (and as root, where RLIMIT_NPROC does not apply) the hook refuses the
    first fork. One harmless fork, not a bomb, so a broken hook cannot take the machine down."""
    res = run_untrusted("import os\nif os.fork() == 0:\n    os._exit(0)\nprint('forked')", namespaces=False, **FAST)
    assert "os.fork is not allowed" in res.stderr and "forked" not in res.stdout
    _contained(res, 4.0)


@needs_ns
def test_escaped_grandchild_is_killed_with_the_run():
    """A child that leaves the process group (setsid) dies with the PID namespace."""
    marker = f"mopd-sandbox-test-{os.getpid()}-{time.monotonic_ns()}"
    src = f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '30', '{marker}'])"
    res = run_untrusted(src + "\nprint('left')", audit=False, **FAST)
    assert res.stdout == "left\n"
    time.sleep(0.1)
    survivors = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    survivors.append(pid)
        except OSError:
            pass
    assert survivors == []


def test_infinite_loop(row):
    res = run_untrusted("while True: pass", **{**FAST, "wall_s": 20.0})
    assert res.reason == "cpu", res  # RLIMIT_CPU: SIGXCPU after cpu_s of CPU time
    _contained(res, 20.0)
    killed = code.EXEC_OUTCOMES["cpu"] + code.EXEC_OUTCOMES["timeout"]
    _scores_zero_then_one(row, _stmt("while True: pass"))
    assert code.EXEC_OUTCOMES["cpu"] + code.EXEC_OUTCOMES["timeout"] == killed + 1
    res = run_untrusted("import time\ntime.sleep(60)", **{**FAST, "wall_s": 0.5})
    assert res.reason == "timeout"  # sleeping burns no CPU: the wall clock kills the group
    _contained(res, 3.0)


def test_memory_hog(row):
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(32 << 20))"
    res = run_untrusted(hog, **{**FAST, "memory_mb": 128})
    assert "MemoryError" in res.stderr  # RLIMIT_AS
    _contained(res, 4.0)
    _scores_zero_then_one(row, _stmt(hog))


def test_file_size_limit():
    res = run_untrusted("open('big', 'wb').write(b'x' * (8 << 20))", **FAST)
    assert "File too large" in res.stderr or res.reason == "file_size"


def _write_outside(path: str) -> str:
    return f"open({path!r}, 'w').write('pwned')"


def test_write_outside_verifier(row, tmp_path):
    target = tmp_path / "pwned"
    _scores_zero_then_one(row, _stmt(_write_outside(str(target))))
    assert not target.exists()


@KERNEL
def test_write_outside_kernel_layer(kernel, tmp_path):
    """The host's directories, even world-writable ones, are not in the minimal root; the root
    itself is read-only."""
    open_dir = tempfile.mkdtemp(prefix="mopd-sandbox-test-")
    os.chmod(open_dir, 0o777)  # writable by nobody: only its absence from the root stops the write
    try:
        for target in (tmp_path / "pwned", os.path.join(open_dir, "pwned")):
            res = run_untrusted(_write_outside(str(target)), audit=False, backend=kernel, **FAST)
            assert not os.path.exists(target) and not res.ok, res
            assert "No such file or directory" in res.stderr, res
        res = run_untrusted(_write_outside("/pwned"), audit=False, backend=kernel, **FAST)
        assert "Read-only file system" in res.stderr and not os.path.exists("/pwned"), res
        assert (
            run_untrusted(
                "open('inside', 'w').write('ok')\nprint(open('inside').read())", audit=False, backend=kernel
            ).stdout
            == "ok\n"
        )
    finally:
        os.rmdir(open_dir)


def test_write_outside_audit_layer(tmp_path):
    target = tmp_path / "pwned"
    res = run_untrusted(_write_outside(str(target)), namespaces=False, **FAST)
    assert "writing outside the working directory" in res.stderr and not target.exists()
    res = run_untrusted(f"import os\nos.remove({str(tmp_path)!r})", namespaces=False, **FAST)
    assert "outside the working directory" in res.stderr and tmp_path.exists()


SECRET = "mopd-test-secret-4711"
SNOOP = (
    "import os\nout = [dict(os.environ)]\n"
    "for pid in ({pid}, os.getppid(), 1):\n"
    "    try:\n        out.append(open('/proc/%d/environ' % pid).read())\n"
    "    except OSError as e:\n        out.append(repr(e))\nprint(out)"
)


@pytest.mark.parametrize("layer", ["default", "kernel", "audit"])
def test_parent_environment_is_invisible(layer, monkeypatch):
    if layer == "kernel":
        require("sandbox")
    monkeypatch.setenv("MOPD_TEST_SECRET", SECRET)
    kw = {"default": {}, "kernel": {"audit": False}, "audit": {"namespaces": False}}[layer]
    res = run_untrusted(SNOOP.format(pid=os.getpid()), **kw, **FAST)
    assert res.ok and SECRET not in res.stdout + res.stderr, res
    # Python itself sets LC_CTYPE (PEP 538 locale coercion); nothing comes from us.
    assert set(eval(res.stdout)[0]) <= {"LC_CTYPE"}


def test_parent_environment_verifier(row, monkeypatch):
    monkeypatch.setenv("MOPD_TEST_SECRET", SECRET)
    secret_row = code.generate_exec(random.Random(0), 1, "train")[0]
    secret_row.meta.update(value=SECRET, answer=repr(SECRET))
    verify = get_verifier("code").verify
    assert verify(secret_row, "__import__('os').environ.get('MOPD_TEST_SECRET')") == 0.0
    env_of_test = f"open('/proc/{os.getpid()}/environ').read().split('MOPD_TEST_SECRET=')[1].split(chr(0))[0]"
    assert verify(secret_row, env_of_test) == 0.0
    assert verify(secret_row, secret_row.meta["answer"]) == 1.0


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.2)
    yield srv
    srv.close()


def _connect(port: int) -> str:
    return f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')"


def _no_connection(srv: socket.socket) -> bool:
    try:
        srv.accept()[0].close()
    except TimeoutError:
        return True
    return False


def test_socket_verifier(row, listener):
    _scores_zero_then_one(row, _stmt(_connect(listener.getsockname()[1])))
    assert _no_connection(listener)


@KERNEL
def test_socket_kernel_layer(kernel, listener):
    """A fresh network namespace: the host's 127.0.0.1 is unreachable (no interface is up, or under
    bwrap only the namespace's own loopback, where nothing listens)."""
    res = run_untrusted(_connect(listener.getsockname()[1]), audit=False, backend=kernel, **FAST)
    expected = "unreachable" if kernel == "namespaces" else "Connection refused"
    assert not res.ok and expected in res.stderr, res
    assert _no_connection(listener)


def test_socket_audit_layer(listener):
    res = run_untrusted(_connect(listener.getsockname()[1]), namespaces=False, **FAST)
    assert "socket" in res.stderr and "not allowed" in res.stderr, res
    assert _no_connection(listener)


def test_working_directory_is_fresh_and_removed():
    a = run_untrusted("import os\nprint(os.getcwd())\nopen('left_behind', 'w').close()", **FAST)
    b = run_untrusted("import os\nprint(os.getcwd(), sorted(os.listdir('.')))", **FAST)
    assert a.ok and b.ok and b.stdout.split()[0] != a.stdout.strip()
    assert "left_behind" not in b.stdout
    assert not os.path.exists(a.stdout.strip())  # the host path is deleted after the run


# ---------------------------------------------------------------------- unix sockets


UNIX_CONNECT = (
    "import socket\n"
    "for addr in ({path!r}, {abstract!r}):\n"
    "    s = socket.socket(socket.AF_UNIX)\n"
    "    try:\n        s.connect(addr)\n        print('connected')\n"
    "    except OSError as e:\n        print(type(e).__name__)\n"
)


@pytest.fixture
def unix_listeners():
    """A world-connectable socket in a world-writable directory under /tmp, and an abstract one."""
    sock_dir = tempfile.mkdtemp(prefix="mopd-sandbox-sock-")
    os.chmod(sock_dir, 0o777)
    path, abstract = os.path.join(sock_dir, "s"), f"\0mopd-sandbox-test-{os.getpid()}-{time.monotonic_ns()}"
    servers = []
    for addr in (path, abstract):
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(addr)
        srv.listen(4)
        servers.append(srv)
    os.chmod(path, 0o777)
    yield path, abstract
    for srv in servers:
        srv.close()
    shutil.rmtree(sock_dir)


@KERNEL
def test_host_unix_sockets_are_unreachable(kernel, unix_listeners):
    """Regression (issue 15): a world-connectable unix socket of the host was reachable from inside
    (the network namespace covers only abstract ones; a read-only mount does not stop connect).
    Without the kernel layer the same program connects to both (and the socket lets anyone in)."""
    prog = UNIX_CONNECT.format(path=unix_listeners[0], abstract=unix_listeners[1])
    outside = run_untrusted(prog, audit=False, namespaces=False, **FAST)
    assert outside.stdout.split() == ["connected", "connected"], outside
    assert os.stat(unix_listeners[0]).st_mode & 0o777 == 0o777
    res = run_untrusted(prog, audit=False, backend=kernel, **FAST)
    assert res.ok and res.stdout.split() == ["FileNotFoundError", "ConnectionRefusedError"], res


@KERNEL
def test_no_socket_file_is_visible_inside(kernel):
    """No path-based socket anywhere in the sandbox's file system: the host's /run, /var/run,
    /dev/shm, /tmp, home and project directories are not in its root (its /tmp holds only the
    working directory). The walk skips /usr and the interpreter's prefix (system files, and many)
    to stay fast."""
    walk = (
        "import json, os, stat\nfound, seen = [], 0\n"
        "for d, dirs, files in os.walk('/'):\n"
        "    if d == '/':\n        dirs[:] = [x for x in dirs if x not in ('proc', 'usr', 'root')]\n"
        "    for name in files:\n        seen += 1\n"
        "        try:\n            if stat.S_ISSOCK(os.lstat(os.path.join(d, name)).st_mode):\n"
        "                found.append(os.path.join(d, name))\n"
        "        except OSError:\n            pass\n"
        "print(json.dumps([seen, found, sorted(os.listdir('/')), os.listdir('/tmp'), os.getcwd()]))"
    )
    res = run_untrusted(walk, audit=False, backend=kernel, **FAST)
    assert res.ok, res
    seen, found, top, tmp, cwd = json.loads(res.stdout)
    assert seen > 100 and found == [], res.stdout  # it did look at the system's files
    prefix_top = os.path.realpath(sys.base_prefix).split("/")[1]  # bound in so the interpreter runs
    assert not {"run", "var", "home", "work", "mnt", "sys", "opt", "srv"} - {prefix_top} & set(top), top
    assert ["/tmp/" + name for name in tmp] == [cwd]


# ---------------------------------------------------------------------- disk cap


FILL_DISK = (
    "import os\nwritten = 0\n"
    "try:\n"
    "    for i in range(10000):\n"
    "        with open('f%d' % i, 'wb') as f:\n"
    "            f.write(b'x' * (512 << 10))\n"  # under the 1 MiB per-file limit: only the disk cap stops it
    "        written += 512 << 10\n"
    "finally:\n"
    "    print(written, flush=True)\n"
)


@pytest.fixture
def host_work_sizes(monkeypatch):
    """Bytes in each run's host working directory when the sandbox deletes it."""
    sizes, rmtree = [], shutil.rmtree

    def spy(path, *a, **k):
        if os.path.basename(path).startswith("mopd-sandbox-") and "-io-" not in path:
            sizes.append(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs))
        return rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", spy)
    return sizes


@KERNEL
def test_disk_cap(kernel, host_work_sizes):
    """Regression (issue 15): one response wrote 0.9-1.6 GiB into its temp directory in a second.
    The working directory is a tmpfs of disk_mb: writing past it fails with ENOSPC, the verdict
    says so, and nothing reaches the host's disk (its directory holds only main.py)."""
    res = run_untrusted(FILL_DISK, audit=False, backend=kernel, **{**FAST, "disk_mb": 4})
    assert res.reason == "disk_limit" and "No space left on device" in res.stderr, res
    assert 2 << 20 <= int(res.stdout) <= 4 << 20 and 3 << 20 <= res.disk_bytes <= 4 << 20, res
    assert host_work_sizes == [len(FILL_DISK)]
    if kernel == "namespaces":  # bwrap's --tmpfs takes a size but no inode count
        many_files = "for i in range(100000):\n    open('e%d' % i, 'w').close()"
        res = run_untrusted(many_files, audit=False, backend=kernel, **{**FAST, "disk_files": 50})
        assert res.reason == "disk_limit" and "No space left on device" in res.stderr, res
    fits = "open('f', 'wb').write(b'x' * (512 << 10))\nprint('fits')"
    ok = run_untrusted(fits, backend=kernel, **{**FAST, "disk_mb": 4})
    assert ok.ok and ok.reason == "ok" and ok.stdout == "fits\n", ok


def test_disk_cap_verifier(row):
    """The verifier's response is stopped by the disk cap (counted as such), not by another limit."""
    killed = code.EXEC_OUTCOMES["disk_limit"]
    _scores_zero_then_one(row, _stmt(FILL_DISK))
    if sandbox.isolation() == "basic":  # no tmpfs without a kernel layer: nothing caps the disk
        require("sandbox")
    assert code.EXEC_OUTCOMES["disk_limit"] == killed + 1


# ---------------------------------------------------------------------- no kernel layer


def test_unisolated_runs_are_refused_unless_allowed(monkeypatch, row):
    """Without the kernel layer only the audit hook guards network and files, and it can be got
    past: run_untrusted refuses unless the process opted in (recipe key sandbox.allow_unisolated)."""
    monkeypatch.setattr(sandbox, "isolation", lambda: "basic")
    monkeypatch.setattr(sandbox, "_ALLOW_UNISOLATED", False)
    with pytest.raises(sandbox.SandboxUnavailableError, match="sandbox.allow_unisolated=true"):
        run_untrusted("print(1)", **FAST)
    refused = code.EXEC_OUTCOMES["error: SandboxUnavailableError"]
    assert get_verifier("code").verify(row, row.meta["answer"]) == 0.0
    assert code.EXEC_OUTCOMES["error: SandboxUnavailableError"] == refused + 1
    sandbox.allow_unisolated(True)
    res = run_untrusted("print(1)", **FAST)
    assert res.ok and res.stdout == "1\n" and res.disk_bytes is None, res  # basic mode: no tmpfs


# What a program does to get past the audit hook: subprocess.Popen's own audit call goes through the
# module's `sys`, and _posixsubprocess.fork_exec raises no audit event at all.
BYPASS = (
    "import subprocess, sys, types\n"
    "subprocess.sys = types.SimpleNamespace(**{{k: getattr(sys, k) for k in dir(sys) if not k.startswith('__')}})\n"
    "subprocess.sys.audit = lambda *a: None\n"
    "p = subprocess.run([sys.executable, '-I', '-S', '-c', {inner!r}], capture_output=True, text=True)\n"
    "print(p.stdout.strip() or p.stderr.strip().splitlines()[-1])\n"
)
ESCAPE = (
    "import socket\nprint('spawned', end=' ')\n"
    "try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n    print('connected')\n"
    "except OSError as e:\n    print(type(e).__name__)\n"
)


@KERNEL
def test_audit_hook_bypass_is_held_by_the_kernel_layer(kernel, listener):
    """The audit hook is defence in depth only: a program gets past it (first run, no kernel layer,
    reaches the host's loopback), and the kernel layer still holds (second run, hook on)."""
    prog = BYPASS.format(inner=ESCAPE.format(port=listener.getsockname()[1]))
    res = run_untrusted(prog, namespaces=False, **FAST)
    assert res.stdout.strip() == "spawned connected", res
    listener.accept()[0].close()
    res = run_untrusted(prog, backend=kernel, **FAST)
    assert res.stdout.split()[0] == "spawned" and "connected" not in res.stdout, res
    assert _no_connection(listener)


def test_isolation_prefers_namespaces_then_bwrap(monkeypatch):
    """isolation() takes our own namespaces where they work, else bubblewrap, else basic (and says
    why in the refusal)."""
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setattr(sandbox, "_WORKS", {"namespaces": True, "bwrap": True})
    assert sandbox.isolation() == "namespaces"
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setattr(sandbox, "_WORKS", {"namespaces": False, "bwrap": True})
    assert sandbox.isolation() == "bwrap"
    monkeypatch.setattr(sandbox, "_ISOLATION", None)
    monkeypatch.setattr(sandbox, "_WORKS", {"namespaces": False, "bwrap": False})
    assert sandbox.isolation() == "basic" and "bubblewrap" in sandbox.unisolated_message()
