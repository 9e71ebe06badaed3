"""Surviving actor failures: calls on restartable Ray actors (teachers, rollout workers) are retried
once Ray has restarted the actor; a failure that cannot be recovered raises ``ActorFailedError``.

    calls = RestartingCalls("teacher", max_restarts=3)
    results = calls.run([(actor, "score", args), ...])          # retried per call on a restart
    results = calls.run(calls_list, prepare=lambda actor: ...)  # restore state a fresh actor lacks

Ray restarts an actor started with ``max_restarts`` by running its constructor again, so a call
that was in flight fails with ``RayActorError`` and the fresh actor has only its initial state
(``prepare`` puts back the rest, e.g. the rollout pool re-sends the current policy weights). The
caller sees the results of a successful attempt only, so a step is never half-applied. Ray is
imported only when a call runs; this module is importable without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("mopd")

Call = tuple[Any, str, tuple]  # (actor handle, method name, positional args)


class ActorFailedError(RuntimeError):
    """An actor died and cannot be recovered: a trainer rank, or a worker out of restarts."""


class RestartingCalls:
    """Runs method calls on actors of one kind (``"teacher"``, ``"rollout"``), retrying each call
    whose actor died after Ray restarted it; ``restarts`` counts the restarts seen (a metric)."""

    def __init__(self, kind: str, max_restarts: int, ready_timeout_s: float = 600.0) -> None:
        self.kind, self.max_restarts, self.ready_timeout_s = kind, max_restarts, ready_timeout_s
        self.restarts = 0

    def run(self, calls: Sequence[Call], prepare: Callable[[Any], None] | None = None) -> list[Any]:
        """Results of ``calls`` (submitted concurrently) in order. A call whose actor died is
        resubmitted after the actor is back and ``prepare(actor)`` ran, at most ``max_restarts`` times."""
        import ray
        from ray.exceptions import RayActorError

        refs = [_submit(c) for c in calls]
        results: list[Any] = [None] * len(calls)
        failures = [0] * len(calls)
        for i, call in enumerate(calls):
            while True:
                try:
                    results[i] = ray.get(refs[i])
                    break
                except RayActorError as e:
                    failures[i] += 1
                    if failures[i] > self.max_restarts:
                        who = f"a {self.kind} actor ({call[1]})"
                        raise ActorFailedError(f"{who} kept dying ({failures[i]} times): {_first_line(e)}") from e
                    self.recover(call[0], f"{call[1]} failed: {_first_line(e)}", prepare)
                    refs[i] = _submit(call)
        return results

    def recover(self, actor: Any, why: str, prepare: Callable[[Any], None] | None = None) -> None:
        """Wait until Ray has restarted ``actor``, run ``prepare(actor)``, count and log the restart."""
        self.restarts += 1
        log.warning("%s actor died (%s); waiting for Ray to restart it (restart %d)", self.kind, why, self.restarts)
        self.wait_ready(actor)
        if prepare is not None:
            prepare(actor)
        log.warning("%s actor restarted; retrying its call", self.kind)

    def wait_ready(self, actor: Any) -> None:
        """Block until ``actor`` answers; ``ActorFailedError`` if Ray will not restart it."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorUnavailableError:  # restarting: the call was refused, not queued
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            except ActorDiedError as e:
                raise ActorFailedError(
                    f"a {self.kind} actor died and Ray did not restart it (ray.max_restarts="
                    f"{self.max_restarts} used up, or its constructor failed): {_first_line(e)}"
                ) from e
            except GetTimeoutError:
                break
        raise ActorFailedError(f"a {self.kind} actor did not come back within {self.ready_timeout_s:.0f}s")


def _submit(call: Call) -> Any:
    actor, method, args = call
    return getattr(actor, method).remote(*args)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
