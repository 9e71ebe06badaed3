"""A group of worker actors: start them, call them, survive their deaths, shut them down. Each pool
(teachers, rollout, trainer) owns one group and keeps only what is its own.

    group = ActorGroup("rollout", max_restarts=3, prepare=resend_weights)
    group.start(HFRolloutActor, [(cfg, 0), (cfg, 1)], num_cpus=1, env=[cfg.ray.env])
    group.ready()                                  # constructor errors surface here
    batches = group.call_each("generate", [args_0, args_1])
    pad_id = group.call_one(0, "pad_token_id")
    group.shutdown()

Starting: ``start(cls, args_per_actor, ...)`` runs ``cls(*args, **kwargs)`` once per ``args`` as a
Ray actor with the given resources and ``runtime.actor_env`` environment (one thread per reserved
CPU, then ``env`` in order); it may be called more than once (the teacher pool starts one class per
domain into one group), and actor ``i`` (index in the group) is named in errors as
``"<kind> <label> <j>"``. With ``placement_group`` actor ``i`` goes to bundle ``i``, or to the bundle
``start(..., bundles=...)`` names for it; the group removes the placement group on shutdown unless
``owns_placement_group=False`` (the run's one group, mopd/dist/placement.py, shared by every pool). With
``local=True`` the instances live in this process
(tests, debugging): resources, environment and placement are ignored and calls run in order.

Calls: ``call(calls)`` runs ``(actor index, method, args)`` calls concurrently and returns their
results in order; ``call_all``, ``call_each`` and ``call_one`` are its common shapes. An exception
raised by the method itself propagates as is. An actor's death follows one setting, ``max_restarts``
(also given to Ray):

- ``max_restarts > 0`` (teachers, rollout): Ray restarts a dead actor by running its constructor
  again; the call that was in flight fails with ``RayActorError``. The group waits until the actor
  answers again, runs ``prepare(actor)`` (put back state a fresh actor lacks, e.g. the current
  policy weights), counts the restart (``restarts``, the ``faults/<kind>_restarts`` metrics), logs
  it and resubmits the call with the same arguments, at most ``max_restarts`` times per call. The
  caller sees the results of successful attempts only, so a step is never half-applied.
- ``max_restarts == 0`` (trainer ranks, whose DeepSpeed state and process group cannot be rebuilt):
  the first death raises ``ActorFailedError`` naming the actor and the method, at once, without
  waiting on the other actors (they may hang in a collective their dead peer never joins).

Ray is imported only when actors start; this module is importable without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mopd.dist.runtime import actor_env

log = logging.getLogger(__name__)

Call = tuple[int, str, tuple]  # (actor index in the group, method name, positional args)


class ActorFailedError(RuntimeError):
    """An actor died and cannot be recovered: a trainer rank, a worker out of restarts, or an actor
    whose constructor failed."""


class ActorGroup:
    """Actors of one kind (``"teacher"``, ``"rollout"``, ``"trainer"``) and what happens when one dies.

    kind          names the actors in logs and errors ("teacher actor died ...", "trainer rank 1 ...")
    max_restarts  times Ray restarts a dead actor, its call then retried; 0: a death raises at once
    prepare       run on a restarted actor before its call is retried (restartable groups)
    local         in-process instances instead of Ray actors
    placement_group  a ready Ray placement group: actor i goes to bundle i (or as ``start`` says)
    owns_placement_group  remove the placement group on shutdown (False: someone else does)
    ready_timeout_s  how long to wait for a dead actor to come back
    """

    def __init__(
        self,
        kind: str,
        *,
        max_restarts: int = 0,
        prepare: Callable[[Any], None] | None = None,
        local: bool = False,
        placement_group: Any = None,
        owns_placement_group: bool = True,
        ready_timeout_s: float = 600.0,
    ) -> None:
        self.kind, self.max_restarts, self.prepare, self.local = kind, max_restarts, prepare, local
        self.placement_group, self.ready_timeout_s = placement_group, ready_timeout_s
        self.owns_placement_group = owns_placement_group
        self.restarts = 0  # restarts seen so far
        self.actors: list[Any] = []  # Ray actor handles, or instances with local=True
        self._names: list[str] = []
        self._stoppable: list[bool] = []  # whose class has a shutdown method
        self.bundles: list[int] = []  # placement group bundle of each actor (with placement_group)

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i: int) -> Any:
        return self.actors[i]

    # ----------------------------------------------------------------- start

    def start(
        self,
        cls: type,
        args_per_actor: Sequence[tuple],
        *,
        kwargs: Mapping[str, Any] | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        env: Sequence[Mapping[str, str]] = (),
        label: str = "replica",
        bundles: Sequence[int] | None = None,
    ) -> list[int]:
        """Start one ``cls(*args, **kwargs)`` per entry of ``args_per_actor``; returns their indices
        in the group. Does not wait for the constructors (``ready`` does): actors load in parallel.
        ``bundles``: the placement group bundle of each (default: its index in the group)."""
        first, kwargs = len(self.actors), dict(kwargs or {})
        if bundles is None:
            bundles = range(first, first + len(args_per_actor))
        if len(bundles) != len(args_per_actor):
            raise ValueError(f"{len(bundles)} bundles for {len(args_per_actor)} {self.kind} actors")
        remote_cls: Any = None
        if not self.local:
            import ray

            remote_cls = ray.remote(cls)
            options = dict(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=self.max_restarts,
                runtime_env={"env_vars": actor_env(num_cpus, *env)},
            )
        for j, (args, b) in enumerate(zip(args_per_actor, bundles, strict=True)):
            if self.local:
                actor = cls(*args, **kwargs)
            else:
                actor = remote_cls.options(**options, **self._placement(b)).remote(*args, **kwargs)
            self.actors.append(actor)
            self.bundles.append(b)
            self._names.append(f"{self.kind} {label} {j}")
            self._stoppable.append(callable(getattr(cls, "shutdown", None)))
        return list(range(first, len(self.actors)))

    def _placement(self, bundle: int) -> dict[str, Any]:
        if self.placement_group is None:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group, placement_group_bundle_index=bundle
        )
        return {"scheduling_strategy": strategy}

    def ready(self) -> None:
        """Block until every actor's constructor has run. If one failed, shut the group down and
        raise ``ActorFailedError`` naming it (without waiting on the others, which may hang)."""
        if self.local:
            return  # the constructors ran in start()
        import ray
        from ray.exceptions import RayActorError

        pending = {a.__ray_ready__.remote(): i for i, a in enumerate(self.actors)}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as e:
                name = self._names[i]
                self.shutdown()
                raise ActorFailedError(f"{name} failed to start: {e}") from e

    # ----------------------------------------------------------------- calls

    def call(self, calls: Sequence[Call]) -> list[Any]:
        """Results of ``calls`` (submitted concurrently; in order in-process), in order; an actor's
        death is retried or raised as the group's ``max_restarts`` says (module docstring)."""
        if self.local:
            return [getattr(self.actors[i], method)(*args) for i, method, args in calls]
        import ray
        from ray.exceptions import RayActorError

        results: list[Any] = [None] * len(calls)
        failures = [0] * len(calls)
        pending = {self._submit(call): k for k, call in enumerate(calls)}
        while pending:  # in completion order: a failure is seen while other calls still run
            [ref], _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ref)
            try:
                results[k] = ray.get(ref)
            except RayActorError as e:
                i, method, _ = calls[k]
                failures[k] += 1
                if failures[k] > self.max_restarts:
                    again = f" (after {self.max_restarts} restarts)" if self.max_restarts else ""
                    raise ActorFailedError(f"{self._names[i]} died during {method}{again}: {_first_line(e)}") from e
                self.recover(i, f"{method} failed: {_first_line(e)}")
                pending[self._submit(calls[k])] = k
        return results

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every actor; results in actor order."""
        return self.call([(i, method, args) for i in range(len(self.actors))])

    def call_each(self, method: str, args_per_actor: Sequence[tuple]) -> list[Any]:
        """``method(*args_per_actor[i])`` on actor i; may be shorter than the group (fewer pieces of
        work than actors): only the first ``len(args_per_actor)`` actors are called."""
        if len(args_per_actor) > len(self.actors):
            raise ValueError(f"{len(args_per_actor)} calls for {len(self.actors)} {self.kind} actors")
        return self.call([(i, method, args) for i, args in enumerate(args_per_actor)])

    def call_one(self, i: int, method: str, *args: Any) -> Any:
        """``method(*args)`` on actor i."""
        return self.call([(i, method, args)])[0]

    def _submit(self, call: Call) -> Any:
        i, method, args = call
        return getattr(self.actors[i], method).remote(*args)

    # ----------------------------------------------------------------- restarts

    def recover(self, i: int, why: str) -> None:
        """Count and log a restart of actor i, wait until Ray has restarted it and run ``prepare``.
        Also for a restart noticed otherwise (the rollout pool: a batch of a stale policy version)."""
        self.restarts += 1
        log.warning("%s actor died (%s); waiting for Ray to restart it (restart %d)", self.kind, why, self.restarts)
        self._wait_restarted(i)
        if self.prepare is not None:
            self.prepare(self.actors[i])
        log.warning("%s actor restarted; retrying its call", self.kind)

    def _wait_restarted(self, i: int) -> None:
        """Block until actor i answers; ``ActorFailedError`` if Ray will not restart it."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                ray.get(self.actors[i].__ray_ready__.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorUnavailableError:  # restarting: the call was refused, not queued
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            except ActorDiedError as e:
                raise ActorFailedError(
                    f"{self._names[i]} died and Ray did not restart it (ray.max_restarts="
                    f"{self.max_restarts} used up, or its constructor failed): {_first_line(e)}"
                ) from e
            except GetTimeoutError:
                break
        raise ActorFailedError(f"{self._names[i]} did not come back within {self.ready_timeout_s:.0f}s")

    # ----------------------------------------------------------------- shutdown

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Ask every actor whose class has a ``shutdown`` method to run it (all at once, at most
        ``timeout_s``), then kill every actor and remove the placement group if the group owns it.
        Safe to call twice."""
        actors, stoppable = self.actors, self._stoppable
        pg = self.placement_group if self.owns_placement_group else None
        self.placement_group = None
        self.actors, self._names, self._stoppable, self.bundles = [], [], [], []
        asked = [a for a, s in zip(actors, stoppable, strict=True) if s]
        if self.local:
            for a in asked:
                try:
                    a.shutdown()
                except Exception as e:  # keep releasing the others
                    log.warning("%s shutdown: %s", self.kind, e)
            return
        if not actors and pg is None:
            return
        import ray

        try:
            if asked:
                ray.get([a.shutdown.remote() for a in asked], timeout=timeout_s)
        except Exception as e:  # a dead or stuck actor: the kill below still releases the rest
            log.warning("%s shutdown: %s", self.kind, e)
        finally:
            for a in actors:
                ray.kill(a)
            if pg is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
