"""The ``code_tests`` verifier: run the response's program against the row's tests in the sandbox
(``mopd.sandbox``); the reward is the fraction of tests passed.

    row = PromptRow("Write add(a, b).", "code", meta={"tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]})
    code_tests(row, "```python\\ndef add(a, b):\\n    return a + b\\n```")     # 1.0
    row.meta["tests"] = [{"input": "1 2\\n", "output": "3\\n"}]                  # stdin/stdout tests
    code_tests(row, "```python\\na, b = map(int, input().split())\\nprint(a + b)\\n```")  # 1.0

The program is the response's last fenced block tagged ``python``/``py``/``python3``, else its last
untagged block, else the whole response (an unclosed last fence runs to the end of the text).

``row.meta["tests"]`` is a list of assert-style tests (each a string of Python run after the
program, in its namespace, with ``__name__ == "solution"`` and an empty stdin) or of
stdin/stdout pairs ``{"input": str, "output": str}`` (the program runs as ``__main__`` with that
stdin; its stdout passes if it equals ``output`` once trailing whitespace is stripped from every
line and trailing empty lines are dropped). APPS' ``{"inputs": [...], "outputs": [...]}`` and a
JSON string of any of these are read too. ``row.meta["timeout_s"]`` (default ``TIMEOUT_S``) limits
each test: that much CPU time, and ``WALL_FACTOR`` times it (plus a second) of wall time.

All of a row's tests run in one sandboxed process (a harness, ``HARNESS``), each test afresh: the
program re-executed in a new namespace and with fresh stdin/stdout, under its own CPU and wall
timers. The harness reports each test's result on the original stdout in lines tagged with a
random nonce, so a program's own output (or a fake "passed" line, or ``exit()``) counts for
nothing; program output goes to a file. A test that overruns is interrupted and fails; if the
program swallows the interruption, the harness gives up on the process ``GRACE_S`` later and a new
process runs the remaining tests, as it does when a test kills the process (``os._exit``, a
crash): a hang costs only its own test. Anything the sandbox cannot do (no kernel layer and no
``sandbox.allow_unisolated``, a launch failure) scores 0.0 with a warning, like ``exec_match``.

Not a defence against a program that games its tests: one that returns an object equal to
everything passes asserts, and one that walks the harness's memory could find the nonce. The
sandbox contains what the program does; the tests decide what it is worth.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mopd.types import PromptRow

log = logging.getLogger(__name__)

# Per-test limit in seconds of CPU time, unless the row says (``meta["timeout_s"]``).
TIMEOUT_S = 3.0
# A test may take this many times its CPU limit (+ 1 s) in wall time (sleeping, blocked, a busy machine).
WALL_FACTOR = 3.0
# After a test's timer fired, how long the program may go on ignoring it before the process is dropped.
GRACE_S = 0.5
# What starting the harness process may take on top of its tests (wall seconds).
STARTUP_S = 5.0
# The sandbox limits of one harness process (mopd.sandbox.run_untrusted), besides its time.
LIMITS: dict[str, Any] = dict(memory_mb=512, max_procs=16, max_file_mb=8, disk_mb=32)
# How harness processes ended, by sandbox reason ("ok", "timeout", "exit 124", "error: ...").
OUTCOMES: Counter = Counter()
PYTHON_TAGS = ("python", "py", "python3")

# The harness: main.py of the sandbox. ``__DATA__`` becomes a JSON literal with nonce, program,
# kind ("assert" or "stdio"), tests, first (the test to start at), cpu_s and wall_s (per test).
HARNESS = r"""
import builtins, json, os, signal, sys, threading, time

def _harness(d):
    nonce, kind, tests = d["nonce"], d["kind"], d["tests"]
    cpu_s, wall_s, grace_s = d["cpu_s"], d["wall_s"], d["grace_s"]
    write, dup2, os_open, close, exit_ = os.write, os.dup2, os.open, os.close, os._exit
    setitimer, clock, cpu, sleep = signal.setitimer, time.monotonic, time.process_time, time.sleep
    open_, compile_, exec_, map_, str_, type_ = open, compile, exec, map, str, type
    builtins.exit = builtins.quit = sys.exit  # as the site module (which python -S skips) would
    pristine = dict(vars(builtins))  # what a program changes in builtins is undone after its test
    report = os.dup(1)
    def say(*words):
        write(report, ("\n" + nonce + " " + " ".join(map_(str_, words)) + "\n").encode())
    try:
        os.remove("main.py")  # it holds the nonce
    except OSError:
        pass
    state = {"test": -1, "since": None, "cpu0": 0.0, "fired": False}
    class Overran(BaseException):
        pass
    def on_timer(signum, frame):
        state["fired"] = True
        raise Overran()
    def watchdog():  # a program that ignores or blocks the timers is dropped, process and all
        while True:
            sleep(0.05)
            test, since, cpu0 = state["test"], state["since"], state["cpu0"]
            if since is not None and (clock() - since > wall_s + grace_s or cpu() - cpu0 > cpu_s + grace_s):
                say("fail", test, "timeout")
                exit_(124)
    signal.signal(signal.SIGALRM, on_timer)
    signal.signal(signal.SIGPROF, on_timer)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails (EFBIG) instead of killing us
    try:
        threading.Thread(target=watchdog, daemon=True).start()
    except RuntimeError:  # no thread to be had (the process limit): the timers alone
        pass
    def norm(text):
        return "\n".join(line.rstrip() for line in text.split("\n")).rstrip("\n")
    def onto(path, flags, target):  # the program may have closed target (open(0) closes it when collected)
        fd = os_open(path, flags, 0o600)
        if fd != target:
            dup2(fd, target)
            close(fd)
    def redirect(stdin_text):
        with open_("stdin.txt", "w") as f:
            f.write(stdin_text)
        onto("stdin.txt", os.O_RDONLY, 0)
        onto("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 1)
        sys.stdin, sys.stdout = open_(0, "r", closefd=False), open_(1, "w", closefd=False)
    def stop_timers():
        state["since"] = None
        setitimer(signal.ITIMER_PROF, 0)
        setitimer(signal.ITIMER_REAL, 0)
    def run(test):
        redirect(test["input"] if kind == "stdio" else "")
        g = {"__name__": "__main__" if kind == "stdio" else "solution"}
        state["fired"], state["cpu0"], state["since"] = False, cpu(), clock()
        setitimer(signal.ITIMER_PROF, cpu_s)
        setitimer(signal.ITIMER_REAL, wall_s)
        try:
            try:
                exec_(program, g)
            except SystemExit as e:  # exit() ends a stdio program; in an assert test the assert never ran
                if kind != "stdio" or e.code not in (None, 0):
                    raise
            if kind == "stdio":
                sys.stdout.flush()
            else:
                exec_(compile_(test, "test", "exec"), g)
        finally:
            stop_timers()
        if kind == "stdio":
            with open_("stdout.txt", errors="replace") as f:
                return "pass" if norm(f.read()) == norm(test["output"]) else "wrong_output"
        return "pass"
    try:
        program = compile(d["program"], "solution.py", "exec")
        broken = None
    except BaseException as e:
        program, broken = None, type(e).__name__
    say("ready")
    for i in range(d["first"], len(tests)):
        state["test"] = i
        say("start", i)
        try:
            verdict = broken or run(tests[i])
        except Overran:
            verdict = "timeout"
        except BaseException as e:
            verdict = type_(e).__name__
        stop_timers()
        table = vars(builtins)
        for name in [k for k in table if k not in pristine]:
            del table[name]
        table.update(pristine)
        if state["fired"]:
            verdict = "timeout"
        say("pass", i) if verdict == "pass" else say("fail", i, verdict)
    say("done")
    exit_(0)  # no waiting for threads the program left running

_harness(json.loads(__DATA__))
"""


@dataclass
class Run:
    """What the harness processes of one verification reported: each test's verdict (True:
    passed) and why the failed ones failed."""

    passed: dict[int, bool] = field(default_factory=dict)
    why: dict[int, str] = field(default_factory=dict)
    processes: int = 0


def _where(row: PromptRow) -> str:
    return f"{row.domain} prompt {row.prompt[:80]!r} (source {row.source or '?'}, row {row.index})"


# ---------------------------------------------------------------------- the program


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.#-]*)")


def extract_program(response: str) -> str:
    """The program in a response: its last ```` ```python ```` block, else its last untagged
    ```` ``` ```` block, else the whole response."""
    blocks: list[tuple[str, list[str]]] = []
    inside: list[str] | None = None
    for line in response.split("\n"):
        fence = _FENCE.match(line)
        if fence and inside is None:
            inside = []
            blocks.append((fence.group(1).lower(), inside))
        elif line.strip() == "```" and inside is not None:
            inside = None
        elif inside is not None:
            inside.append(line)
    for tags in (PYTHON_TAGS, ("",)):
        found = [body for tag, body in blocks if tag in tags]
        if found:
            return "\n".join(found[-1]) + "\n"
    return response


# ---------------------------------------------------------------------- the tests


def _text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(map(str, value))
    return value if isinstance(value, str) else str(value)


def read_tests(row: PromptRow) -> tuple[str, list[Any]]:
    """("assert", [str, ...]) or ("stdio", [{"input": str, "output": str}, ...]) from
    ``row.meta["tests"]``. A row without tests raises ``KeyError``, tests of another shape
    ``ValueError`` (both name the row: a data bug, not the response's fault)."""
    if "tests" not in row.meta:
        raise KeyError(f"{_where(row)} has no 'tests' in its meta; give the code_tests rows a 'tests' list")
    tests = row.meta["tests"]
    try:
        if isinstance(tests, str):
            tests = json.loads(tests)
        if isinstance(tests, dict) and {"inputs", "outputs"} <= set(tests):
            tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{_where(row)}: cannot read meta['tests']: {e}") from e
    if isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests):
        return "assert", list(tests)
    if isinstance(tests, list) and tests and all(isinstance(t, dict) and {"input", "output"} <= set(t) for t in tests):
        return "stdio", [{"input": _text(t["input"]), "output": _text(t["output"])} for t in tests]
    raise ValueError(
        f"{_where(row)}: meta['tests'] must be a non-empty list of assert strings or of "
        f"{{'input': ..., 'output': ...}} pairs, got {str(tests)[:120]}"
    )


def timeout_of(row: PromptRow) -> float:
    value = float(row.meta.get("timeout_s", TIMEOUT_S))
    if not value > 0:
        raise ValueError(f"{_where(row)}: meta['timeout_s'] must be > 0, got {row.meta['timeout_s']!r}")
    return value


# ---------------------------------------------------------------------- running


def _harness_source(program: str, kind: str, tests: list[Any], first: int, nonce: str, cpu_s: float) -> str:
    data = dict(
        nonce=nonce,
        program=program,
        kind=kind,
        tests=tests,
        first=first,
        cpu_s=cpu_s,
        wall_s=WALL_FACTOR * cpu_s + 1.0,
        grace_s=GRACE_S,
    )
    return HARNESS.replace("__DATA__", repr(json.dumps(data)))


def _reports(stdout: str, nonce: str) -> list[tuple[str, int, str]]:
    """(event, test, why) of every harness line (``ready``/``done``: test -1). Lines without the
    nonce are the program's, and ignored."""
    pattern = re.compile(re.escape(nonce) + r" (ready|done|start|pass|fail) ?(\d*) ?(\w*)")
    return [(m.group(1), int(m.group(2) or -1), m.group(3)) for m in pattern.finditer(stdout)]


def _one_process(run: Run, program: str, kind: str, tests: list[Any], first: int, cpu_s: float) -> int | None:
    """Run tests ``first..`` in one harness process and record their verdicts in ``run``. Returns
    the test to go on from (after one that killed the process), ``first`` again if the harness
    never came up, or None when every test has its verdict."""
    from mopd.sandbox import run_untrusted

    nonce = secrets.token_hex(16)
    left = len(tests) - first
    res = run_untrusted(
        _harness_source(program, kind, tests, first, nonce, cpu_s),
        cpu_s=left * (cpu_s + GRACE_S) + 2.0,
        wall_s=left * (WALL_FACTOR * cpu_s + 1.0 + GRACE_S) + STARTUP_S,
        **LIMITS,
    )
    run.processes += 1
    OUTCOMES[res.reason] += 1
    events = _reports(res.stdout, nonce)
    if not any(event == "ready" for event, _, _ in events):
        log.warning("code_tests: the harness did not start (%s): %s", res.reason, res.stderr.strip()[-300:])
        return first
    started = first - 1
    for event, i, why in events:
        if event == "start":
            started = i
        elif event in ("pass", "fail") and i not in run.passed:
            run.passed[i] = event == "pass"
            if why:
                run.why[i] = why
    if started not in run.passed and started >= first:  # it never finished: killed, crashed, exited
        run.passed[started] = False
        run.why[started] = res.reason
    return None if all(i in run.passed for i in range(len(tests))) else started + 1


def run_tests(program: str, kind: str, tests: list[Any], cpu_s: float = TIMEOUT_S) -> Run:
    """Run ``tests`` against ``program`` (module docstring): one harness process, and another from
    the next test whenever one dies mid-test. A harness that does not come up is retried once,
    then its tests fail. Raises what ``run_untrusted`` raises (``SandboxUnavailableError``)."""
    run, first, retries = Run(), 0, 1
    while first < len(tests):
        nxt = _one_process(run, program, kind, tests, first, cpu_s)
        if nxt is None:
            break
        if nxt == first:
            if retries == 0:
                break
            retries -= 1
        first = nxt
    return run


def code_tests(row: PromptRow, response: str) -> float:
    """The fraction of ``row.meta["tests"]`` the response's program passes (module docstring). A
    sandbox failure scores 0.0 with a warning; a row without tests raises ``KeyError``."""
    kind, tests = read_tests(row)
    cpu_s = timeout_of(row)
    try:
        run = run_tests(extract_program(response), kind, tests, cpu_s)
    except Exception as e:  # never let one response stop the run (as exec_match)
        log.warning("code_tests: sandbox failed on %s: %s: %s", _where(row), type(e).__name__, e)
        OUTCOMES[f"error: {type(e).__name__}"] += 1
        return 0.0
    return sum(run.passed.get(i, False) for i in range(len(tests))) / len(tests)


def executes(row: PromptRow) -> bool:
    """``code_tests`` runs the response for every row (the run's sandbox preflight asks)."""
    return True
