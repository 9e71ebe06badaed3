"""Verifiers for real data, chosen per data source by name: a verifier is a function
``verify(row, response) -> float`` (a reward in [0, 1]; ``mopd.domains.VerifyFn``).

    from mopd.verifiers import resolve_verifier, verify_batch
    resolve_verifier("math_answer")(row, response)              # one response
    resolve_verifier("my_pkg.rewards:judge")                    # your own, imported by spec
    verify_batch(["code_tests"] * len(rows), rows, responses)   # many at once, same scores

Built in (``BUILTIN_VERIFIERS``; docs/verifiers.md has the row fields and edge cases of each):
``math_answer`` (final answer vs ``meta["answer"]`` by mathematical equivalence), ``code_tests``
(the program vs ``meta["tests"]`` in the sandbox: the fraction passed), ``tool_call`` (the tool
calls vs ``meta["calls"]`` as data), ``exact`` (``mopd.domains.common.exact_match``). A verifier
that runs the response declares it: ``verifier_executes(spec, row)`` (the run's sandbox preflight);
a ``module:function`` one does so with an ``executes`` attribute (a bool, or a function of the row).

``VerifierPool`` / ``verify_batch`` score a batch concurrently. Where each verifier runs:

* ``code_tests`` and ``module:function`` verifiers: a thread pool (``workers``; the sandbox work is
  in subprocesses, so threads overlap it; a custom verifier may wait on I/O, e.g. a judge model).
* ``math_answer``: on the caller, while the threads work, in a main thread where math_verify's
  timeouts hold; with ``processes > 0`` the sympy comparison goes to a process pool of that size
  instead (the answers are extracted on the caller). math_verify is pure Python (the GIL): threads
  do not speed it up, and on a 2-core machine shared with other jobs 2 processes ran at 0.53x the
  caller (benchmarks/verify_pool.py --math; docs/verifiers.md), so the default is 0; try it on
  many idle cores.
* ``exact``, ``tool_call``: on the caller (microseconds).

Errors: built-in verifiers raise only for bad rows (``KeyError`` for a missing field, ``ValueError``
for one of the wrong shape, both naming the row); whatever a response does (a crash, a hang, text
math_verify cannot read, a sandbox failure) scores 0.0, failures with a warning, like
``exec_match``. ``on_error="raise"`` (default): an exception in any verifier is raised once the whole
batch is done. ``on_error="zero"``: it scores 0.0, logged and counted in ``ERRORS`` by spec, except a
``KeyError`` (a row without its field: a data bug), which is always raised.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from mopd.verifiers import code_tests as _code_tests
from mopd.verifiers import math_answer as _math_answer
from mopd.verifiers.code_tests import code_tests
from mopd.verifiers.math_answer import final_answer, math_answer
from mopd.verifiers.tool_call import tool_call

if TYPE_CHECKING:
    from mopd.types import PromptRow

log = logging.getLogger(__name__)

VerifyFn = Callable[["PromptRow", str], float]
OnError = Literal["raise", "zero"]


def exact(row: PromptRow, response: str) -> float:
    """``mopd.domains.common.exact_match``: 1.0 iff the stripped response is ``meta["answer"]``
    (imported on first use, so that importing this package loads no torch: see ``VerifierPool``)."""
    from mopd.domains.common import exact_match

    return exact_match(row, response)


BUILTIN_VERIFIERS: dict[str, VerifyFn] = {
    "math_answer": math_answer,
    "code_tests": code_tests,
    "tool_call": tool_call,
    "exact": exact,
}
# Whether a built-in verifier runs the response for a row (the others never do).
_EXECUTES: dict[str, Callable[[PromptRow], bool]] = {"code_tests": _code_tests.executes}
# Failures scored 0.0 under on_error="zero", by spec.
ERRORS: Counter = Counter()

__all__ = [
    "BUILTIN_VERIFIERS",
    "ERRORS",
    "VerifierPool",
    "code_tests",
    "default_workers",
    "exact",
    "final_answer",
    "math_answer",
    "resolve_verifier",
    "tool_call",
    "verifier_executes",
    "verify_batch",
]


def _valid() -> str:
    return f"built-in: {', '.join(BUILTIN_VERIFIERS)}; or your own as 'package.module:function'"


def resolve_verifier(spec: str) -> VerifyFn:
    """The verifier a data source names: a built-in name, or ``package.module:function`` (imported;
    ``function`` may be dotted, ``Class.method``). ``ValueError`` for an unknown name, a malformed
    spec or something not callable; ``ImportError`` for a module or function that is not there."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"verifier {spec!r}: expected a name ({_valid()})")
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown verifier {spec!r}; {_valid()}")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"verifier {spec!r}: expected 'package.module:function' (one colon, both parts given)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"verifier {spec!r}: cannot import module {module_name!r} ({e}); is it installed, or is its "
            "directory on PYTHONPATH (on every node that verifies)?"
        ) from e
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ImportError(f"verifier {spec!r}: module {module_name!r} has no {attr!r}; check the name after ':'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(
            f"verifier {spec!r}: {attr!r} is a {type(fn).__name__}, not a function (row, response) -> float"
        )
    return fn


def verifier_executes(spec: str, row: PromptRow) -> bool:
    """Whether verifying ``row`` with ``spec`` runs the response (so needs the sandbox's kernel layer
    or ``sandbox.allow_unisolated``): the built-ins say, a ``module:function`` by its ``executes``
    attribute (a bool or a function of the row; none: it does not)."""
    fn = resolve_verifier(spec)
    builtin = next((name for name, f in BUILTIN_VERIFIERS.items() if f is fn), None)  # also by module:function
    if builtin is not None:
        return builtin in _EXECUTES and _EXECUTES[builtin](row)
    executes = getattr(fn, "executes", False)
    return bool(executes(row)) if callable(executes) else bool(executes)


def default_workers() -> int:
    """Threads of a pool: twice the cores this process may use (a thread mostly waits on its
    sandbox process, and a program that sleeps holds a thread but no core)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 * cores


@dataclass(frozen=True)
class _FunctionSpec:
    """A verifier given as a function (not a name): hashable, and named by it in logs and ``ERRORS``."""

    fn: VerifyFn

    def __str__(self) -> str:
        return f"{getattr(self.fn, '__module__', '?')}:{getattr(self.fn, '__qualname__', repr(self.fn))}"


def _per_row(specs: str | Sequence[str | VerifyFn], n: int) -> list[str | VerifyFn]:
    if isinstance(specs, str):
        return [specs] * n
    if len(specs) != n:
        raise ValueError(f"verify_batch: {len(specs)} verifier specs for {n} rows; give one per row (or one str)")
    return list(specs)


class VerifierPool:
    """Scores batches of (row, response) concurrently (module docstring: where each verifier runs,
    what happens to errors). Keep one for a run: the threads (and processes) are started once.

        with VerifierPool(workers=8) as pool:
            rewards = pool.verify(specs, rows, responses)     # one float per row, in row order
    """

    def __init__(self, workers: int | None = None, processes: int = 0, on_error: OnError = "raise"):
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        self.workers = workers or default_workers()
        self.processes = processes
        self.on_error = on_error
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="mopd-verify")
        self._procs: ProcessPoolExecutor | None = None

    def _process_pool(self) -> ProcessPoolExecutor:
        if self._procs is None:  # forkserver: safe beside the caller's threads, and no copy of its memory
            ctx = multiprocessing.get_context("forkserver")
            self._procs = ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_warm_math)
        return self._procs

    def _submit(
        self, spec: str | _FunctionSpec, fn: VerifyFn, row: PromptRow, response: str
    ) -> Future | Callable[[], float]:
        """A future of the score (threads; a process's comparison for ``math_answer``), or the call
        to make on the caller."""
        if spec == "math_answer" and self.processes > 0:
            gold, pred = _math_answer.answers(row, response)
            if pred is None:
                return lambda: _math_answer.reward(None)
            return self._process_pool().submit(_math_answer.equivalent, gold, pred)
        if spec in ("math_answer", "exact", "tool_call"):
            return lambda: fn(row, response)
        return self._threads.submit(fn, row, response)

    def _job(
        self, spec: str | _FunctionSpec, fn: VerifyFn, row: PromptRow, response: str
    ) -> Future | Callable[[], float]:
        """``_submit``, whose own errors (a math row without its answer) come out with the rest."""
        try:
            return self._submit(spec, fn, row, response)
        except Exception as e:
            return partial(_reraise, e)

    def verify(
        self, specs: str | Sequence[str | VerifyFn], rows: Sequence[PromptRow], responses: Sequence[str]
    ) -> list[float]:
        """The score of each response by its row's verifier (``specs``: one per row, or one for all;
        a spec is a verifier's name, or the function itself, e.g. a domain's registered verifier,
        which runs on the threads)."""
        if len(rows) != len(responses):
            raise ValueError(f"verify_batch: {len(rows)} rows but {len(responses)} responses")
        per_row = [s if isinstance(s, str) else _FunctionSpec(s) for s in _per_row(specs, len(rows))]
        # bad specs fail before any work
        fns = {spec: resolve_verifier(spec) if isinstance(spec, str) else spec.fn for spec in dict.fromkeys(per_row)}
        jobs = [self._job(s, fns[s], r, x) for s, r, x in zip(per_row, rows, responses, strict=True)]
        scores: list[float] = [0.0] * len(jobs)
        failed: list[tuple[int, Exception]] = []
        order = sorted(range(len(jobs)), key=lambda i: isinstance(jobs[i], Future))  # the caller's share first
        for i in order:
            try:
                scores[i] = self._result(per_row[i], jobs[i])
            except Exception as e:
                if isinstance(e, KeyError) or self.on_error == "raise":
                    failed.append((i, e))
                else:
                    ERRORS[str(per_row[i])] += 1
                    log.warning(
                        "verify_batch: %s raised on row %d, scored 0.0: %s: %s", per_row[i], i, type(e).__name__, e
                    )
        if failed:
            i, first = min(failed, key=lambda f: f[0])
            log.error(
                "verify_batch: %d of %d rows raised; the first, row %d (%s): %r",
                len(failed),
                len(jobs),
                i,
                per_row[i],
                first,
            )
            raise first
        return scores

    @staticmethod
    def _result(spec: str | _FunctionSpec, job: Future | Callable[[], float]) -> float:
        if not isinstance(job, Future):
            return float(job())
        if spec == "math_answer":  # a process pool comparison: True / False
            return _math_answer.reward(bool(job.result()))
        return float(job.result())

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)
            self._procs = None

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reraise(error: Exception) -> float:
    raise error


def _warm_math() -> None:
    """A process pool worker's start: load math_verify and sympy before the first answer comes."""
    _math_answer.equivalent("1", "1.0")


_SHARED: VerifierPool | None = None


def shared_pool() -> VerifierPool:
    """This process's pool (default workers; started on first use, its threads idle between
    batches): what the training loop's outcome rewards and evaluation verify on."""
    global _SHARED
    if _SHARED is None:
        _SHARED = VerifierPool()
    return _SHARED


def verify_batch(
    specs: str | Sequence[str],
    rows: Sequence[PromptRow],
    responses: Sequence[str],
    workers: int | None = None,
    *,
    processes: int = 0,
    on_error: OnError = "raise",
) -> list[float]:
    """``VerifierPool(workers, processes, on_error).verify(specs, rows, responses)`` with a pool of
    its own (started and stopped here: for a run, keep a ``VerifierPool``)."""
    with VerifierPool(workers, processes, on_error) as pool:
        return pool.verify(specs, rows, responses)
