"""Tool environments on a pool of Ray workers: each trajectory's calls run as soon as its turn ends,
without waiting for the other trajectories' tools.

    pool = EnvPool("lookup", workers=2, max_concurrent=64, timeout_s=30.0)
    ep = pool.open(row).result()                      # Episode(id, messages, tools)
    fut = pool.step(ep.id, turn.calls, turn.content)  # concurrent.futures.Future[StepResult]
    ...                                               # other trajectories keep generating
    res = fut.result()                                # tool messages, done, reward, info
    stats = pool.close(ep.id)                         # TrajectoryStats: turns, tool_calls, ... timeouts
    pool.shutdown()

Every call returns a ``concurrent.futures.Future`` at once: a rollout waits on whichever are ready
(``concurrent.futures.wait(..., return_when=FIRST_COMPLETED)``, or ``asyncio.wrap_future``).

* Placement: a trajectory lives on one worker (the least loaded when it opened), whose environment
  object keeps its state between turns. Workers are Ray actors in an ``ActorGroup``
  (mopd/dist/actors.py), async actors that run each call in its own thread.
* Bound: at most ``max_concurrent`` calls run at once (over all workers); more wait their turn.
* Timeout: a step may take ``timeout_s`` per call it holds. One that does not finish in time is
  answered with an error tool message per call (``tool_timeouts``); its thread is abandoned and
  its environment dropped, so the trajectory's next step rebuilds it (below). A worker that does
  not answer at all ``wedged_grace_s`` past that is killed and restarted by Ray.
* Death: a worker that dies (a tool killed its process, the node went away) is restarted by Ray
  and the call is retried on it, at most ``max_retries`` times; past that the step is answered
  with errors and ends its trajectory (``info["ended"] = "worker_died"``), and the run goes on.
* Rebuild: a fresh worker holds no environments; it rebuilds one from the trajectory's row and
  replays the trajectory's completed steps (their calls, in order), kept here. Environments
  should therefore be deterministic given the row and the calls (the built-in ones are).
* Results: each tool message is capped to ``max_result_chars`` (a note says what was cut), in the
  worker, so a 10 MB result never crosses the wire.

``local=True``: the workers are objects in this process (tests, debugging); timeouts hold, deaths
cannot happen. Ray is imported only by a pool that starts Ray actors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mopd.dist.actors import ActorFailedError, ActorGroup
from mopd.envs.base import (
    Env,
    EnvError,
    Message,
    ParsedCall,
    StepResult,
    TrajectoryStats,
    apply_step,
    error_message,
    resolve_env,
    summarize,
)
from mopd.types import PromptRow

log = logging.getLogger(__name__)

History = list[tuple[list[ParsedCall], str]]  # a trajectory's completed steps: (calls, content)


@dataclass
class Episode:
    """A trajectory's start: its id in the pool, the first messages and the tool schemas."""

    id: str
    messages: list[Message]
    tools: list[dict[str, Any]]


# --------------------------------------------------------------------------- the worker


def _settle(fut: concurrent.futures.Future, result: Any = None, exc: BaseException | None = None) -> None:
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except concurrent.futures.InvalidStateError:  # the waiter gave up (timeout): nobody reads it
        pass


class EnvActor:
    """Holds the environments of the trajectories placed on it; each call runs in its own thread
    under a deadline (an async Ray actor: calls do not wait for each other)."""

    def __init__(self, env: str | type[Env], env_kwargs: dict[str, Any], plugins: list[str], max_result_chars: int):
        self.cls = resolve_env(env, plugins)
        self.kwargs, self.max_chars = dict(env_kwargs), max_result_chars
        self.envs: dict[str, Env] = {}
        self.epochs: dict[str, int] = {}  # bumped when an environment is dropped: a late thread must not put it back
        self.abandoned: list[threading.Thread] = []

    async def open(self, tid: str, row: PromptRow, timeout_s: float) -> tuple[list[Message], list[dict]]:
        def work() -> tuple[list[Message], list[dict]]:
            env = self._env(tid, row, [], self.epochs.get(tid, 0))
            return env.initial_messages(), env.tools()

        try:
            return await self._in_thread(work, timeout_s)
        except TimeoutError:
            self._drop(tid)
            raise TimeoutError(f"opening environment {self.cls.__name__} took over {timeout_s:g}s") from None

    async def step(
        self, tid: str, row: PromptRow, history: History, calls: list[ParsedCall], content: str, timeout_s: float
    ) -> StepResult:
        epoch = self.epochs.get(tid, 0)
        replay = 0 if tid in self.envs else sum(max(1, len(c)) for c, _ in history)

        def work() -> StepResult:
            return apply_step(self._env(tid, row, history, epoch), calls, content, self.max_chars)

        try:
            return await self._in_thread(work, timeout_s * (max(1, len(calls)) + replay))
        except TimeoutError:
            self._drop(tid)
            return timed_out(calls, timeout_s)

    async def close(self, tid: str) -> None:
        env = self._drop(tid)
        if env is not None:
            threading.Thread(target=env.close, daemon=True).start()  # may be slow; nobody waits

    async def pid(self) -> int:
        return os.getpid()

    async def hung_threads(self) -> int:
        """Threads of timed-out calls still running."""
        self.abandoned = [t for t in self.abandoned if t.is_alive()]
        return len(self.abandoned)

    def shutdown(self) -> None:
        for tid in list(self.envs):
            env = self._drop(tid)
            try:
                if env is not None:
                    env.close()
            except Exception as e:  # release the others
                log.warning("env close: %s", e)

    def _env(self, tid: str, row: PromptRow, history: History, epoch: int) -> Env:
        """The trajectory's environment; built from the row and the replayed history if missing."""
        env = self.envs.get(tid)
        if env is None:
            env = self.cls(row, **self.kwargs)
            for calls, content in history:
                apply_step(env, calls, content, self.max_chars)
            if self.epochs.get(tid, 0) == epoch:
                self.envs[tid] = env
        return env

    def _drop(self, tid: str) -> Env | None:
        self.epochs[tid] = self.epochs.get(tid, 0) + 1
        return self.envs.pop(tid, None)

    async def _in_thread(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                _settle(fut, fn())
            except BaseException as e:
                _settle(fut, exc=e)

        thread = threading.Thread(target=run, daemon=True, name="env-call")
        thread.start()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            self.abandoned.append(thread)
            raise


def timed_out(calls: list[ParsedCall], timeout_s: float) -> StepResult:
    """A step that ran past its deadline: a timeout error per call (a final answer whose reward
    did not come in time ends the episode without one)."""
    why = f"the tool call timed out after {timeout_s:g}s"
    info = {"tool_timeouts": max(1, len(calls)), "timeout": True}
    return StepResult([error_message(c, why) for c in calls], done=not calls, info=info)


# --------------------------------------------------------------------------- the pool


@dataclass
class _Trajectory:
    id: str
    worker: int
    row: PromptRow
    history: History = field(default_factory=list)
    stats: TrajectoryStats = field(default_factory=TrajectoryStats)


class _WorkerGone(Exception):
    """A call that could not be answered by any incarnation of its worker."""

    def __init__(self, why: str, reason: str) -> None:
        super().__init__(why)
        self.reason = reason


class EnvPool:
    """Environment workers and the trajectories placed on them (module docstring).

    env              a registered name, ``module.path:Class``, or an ``Env`` subclass
    workers          worker actors (pre-warmed: started and ready before the first call)
    max_concurrent   calls running at once, over all workers
    timeout_s        per tool call; a step of n calls gets n x timeout_s
    max_result_chars cap of one tool result
    max_retries      retries of a call whose worker died
    env_kwargs       keyword arguments of the environment's constructor
    plugins          ``run.plugins`` modules, imported in every worker before ``env`` is resolved
    num_cpus         Ray CPUs reserved per worker (tools that compute need more than the default 0)
    wedged_grace_s   how long past a call's deadline a silent worker is given before it is restarted
    """

    def __init__(
        self,
        env: str | type[Env],
        *,
        workers: int = 2,
        max_concurrent: int = 64,
        timeout_s: float = 30.0,
        max_result_chars: int = 1 << 16,
        max_retries: int = 3,
        env_kwargs: dict[str, Any] | None = None,
        plugins: Sequence[str] = (),
        local: bool = False,
        num_cpus: float = 0.0,
        wedged_grace_s: float = 30.0,
        ready_timeout_s: float = 120.0,
    ) -> None:
        plugins = [str(Path(p).resolve()) if p.endswith(".py") else p for p in plugins]  # workers' cwd may differ
        self.env_cls = resolve_env(env, plugins)  # fails here, naming the valid ones, before any worker starts
        self.timeout_s, self.max_retries, self.wedged_grace_s = timeout_s, max_retries, wedged_grace_s
        # Ray restarts a dead worker without limit (-1): the per-call limit is max_retries.
        self.group = ActorGroup("env", max_restarts=0 if local else -1, local=local, ready_timeout_s=ready_timeout_s)
        args = (env, dict(env_kwargs or {}), plugins, max_result_chars)
        self.group.start(EnvActor, [args] * workers, num_cpus=num_cpus, label="worker")
        self.group.ready()
        self._calls = concurrent.futures.ThreadPoolExecutor(max_concurrent, thread_name_prefix="env-call")
        self._trajectories: dict[str, _Trajectory] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # placement
        self._recovering = threading.Lock()  # one worker recovery at a time
        self._generation = [0] * workers  # incarnation of each worker as this pool knows it
        self.wedged = 0  # workers restarted because they stopped answering

    def __len__(self) -> int:
        return len(self._trajectories)

    # ----------------------------------------------------------------- trajectories

    def open(self, row: PromptRow) -> concurrent.futures.Future[Episode]:
        """Start a trajectory for ``row`` on the least loaded worker; its ``Episode`` when built."""
        with self._lock:
            load = [0] * len(self.group)
            for t in self._trajectories.values():
                load[t.worker] += 1
            traj = _Trajectory(f"t{next(self._ids)}", load.index(min(load)), row)
            self._trajectories[traj.id] = traj
        return self._calls.submit(self._open, traj)

    def step(self, tid: str, calls: Sequence[ParsedCall], content: str = "") -> concurrent.futures.Future[StepResult]:
        """Run one student turn's ``calls`` (``content``: its text outside them) in trajectory
        ``tid``'s environment; no calls: a final answer. Never raises for what a tool does."""
        return self._calls.submit(self._step, self._trajectories[tid], list(calls), content)

    def stats(self, tid: str) -> TrajectoryStats:
        return self._trajectories[tid].stats

    def close(self, tid: str) -> TrajectoryStats:
        """Forget trajectory ``tid`` and release its environment (in the background); its stats."""
        traj = self._trajectories.pop(tid)
        if self.group.local:
            self._calls.submit(self._run_local, traj.worker, "close", (tid,))
        else:
            self.group[traj.worker].close.remote(tid)  # nobody waits: a dead worker has nothing to close
        return traj.stats

    def metrics(self) -> dict[str, float]:
        """Pool-level fault counters."""
        return {"faults/env_restarts": float(self.group.restarts), "faults/env_wedged": float(self.wedged)}

    def shutdown(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.group.shutdown(timeout_s=10.0)
        self._trajectories.clear()

    # ----------------------------------------------------------------- calls

    def _open(self, traj: _Trajectory) -> Episode:
        try:
            messages, tools = self._call(traj, "open", (traj.id, traj.row, self.timeout_s), self.timeout_s)
        except _WorkerGone as e:
            raise EnvError(f"cannot open {self.env_cls.__name__} for prompt {traj.row.prompt[:80]!r}: {e}") from e
        return Episode(traj.id, messages, tools)

    def _step(self, traj: _Trajectory, calls: list[ParsedCall], content: str) -> StepResult:
        start = time.monotonic()
        replayed = sum(max(1, len(c)) for c, _ in traj.history)
        deadline = self.timeout_s * (max(1, len(calls)) + replayed)
        args = (traj.id, traj.row, traj.history, calls, content, self.timeout_s)
        try:
            res = self._call(traj, "step", args, deadline)
        except _WorkerGone as e:
            res = timed_out(calls, self.timeout_s) if e.reason == "wedged" else _ended(calls, str(e), e.reason)
        if not res.info.get("timeout"):  # a timed-out step's effects are unknown: not replayed
            traj.history.append((calls, content))
        traj.stats.add(res, len(calls), time.monotonic() - start)
        return res

    def _call(self, traj: _Trajectory, method: str, args: tuple, deadline_s: float) -> Any:
        """``method(*args)`` on the trajectory's worker; a dead worker's call retried (module docstring)."""
        if self.group.local:
            return self._run_local(traj.worker, method, args)
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        w = traj.worker
        for attempt in range(self.max_retries + 1):
            generation = self._generation[w]
            ref = getattr(self.group[w], method).remote(*args)
            try:
                return ray.get(ref, timeout=deadline_s + self.wedged_grace_s)
            except RayActorError as e:
                # Back to health first (also when giving up): the worker's other trajectories need it.
                self._recover(w, generation, f"{method} failed: {_first_line(e)}", kill=False)
                if attempt == self.max_retries:
                    why = f"the environment worker died {attempt + 1} times running this call: {_first_line(e)}"
                    raise _WorkerGone(why, "worker_died") from e
                traj.stats.retries += 1
            except GetTimeoutError:
                self.wedged += 1
                self._recover(
                    w, generation, f"no answer to {method} within {deadline_s + self.wedged_grace_s:g}s", kill=True
                )
                raise _WorkerGone("the environment worker stopped answering", "wedged") from None
        raise AssertionError("unreachable")

    def _recover(self, w: int, generation: int, why: str, kill: bool) -> None:
        """Wait for Ray to restart worker ``w`` (killing it first if ``kill``), once per death:
        calls that failed on the same incarnation find it recovered already."""
        import ray

        with self._recovering:
            if self._generation[w] != generation:
                return
            if kill:
                ray.kill(self.group[w], no_restart=False)
            try:
                self.group.recover(w, why)
            except ActorFailedError as e:
                raise _WorkerGone(str(e), "worker_died") from e
            self._generation[w] += 1

    def _run_local(self, w: int, method: str, args: tuple) -> Any:
        result = getattr(self.group[w], method)(*args)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result


def _ended(calls: list[ParsedCall], why: str, reason: str) -> StepResult:
    """A step no worker could answer: errors, and the trajectory ends."""
    return StepResult(
        [error_message(c, why) for c in calls], done=True, info={"tool_errors": len(calls), "ended": reason}
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
