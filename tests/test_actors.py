"""``ActorGroup`` (mopd/dist/actors.py): in-process calls and shutdown, then with a local Ray and a toy
actor: a call whose actor is killed is retried after Ray restarted it (``prepare`` first), a group
without restarts raises ``ActorFailedError`` naming the actor at once, a constructor error surfaces
in ``ready``, and shutdown asks, kills and removes the placement group, twice without harm.

    OMP_NUM_THREADS=1 pytest tests/test_actors.py
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from mopd.dist.actors import ActorFailedError, ActorGroup


def toy_classes():
    """Defined in a function so that Ray ships them by value (the workers cannot import tests/)."""

    class Toy:
        def __init__(self, marker: str = "", fail: bool = False) -> None:
            if fail:
                raise ValueError("no model at this path")
            self.marker, self.state = marker, "initial"
            self.stopped = 0

        def add(self, a: int, b: int) -> int:
            return a + b

        def set_state(self, state: str) -> None:
            self.state = state

        def work(self, seconds: float) -> tuple[int, str]:
            time.sleep(seconds)
            return os.getpid(), self.state

        def pid(self) -> int:
            return os.getpid()

        def fail(self) -> None:
            raise KeyError("a bug in the method")

        def shutdown(self) -> None:
            self.stopped += 1
            if self.marker:
                Path(self.marker).write_text("stopped")

    class Plain:  # no shutdown method: only killed
        def ping(self) -> str:
            return "pong"

    return Toy, Plain


# --------------------------------------------------------------------------- in-process


def test_local_group_calls_in_order_and_shuts_down_once():
    Toy, _ = toy_classes()
    group = ActorGroup("toy", local=True, max_restarts=3)
    assert group.start(Toy, [(), ()]) == [0, 1]
    assert group.start(Toy, [()]) == [2]
    assert len(group) == 3 and isinstance(group[2], Toy)
    group.ready()  # the constructors already ran
    assert group.call_all("add", 1, 2) == [3, 3, 3]
    assert group.call_each("add", [(1, 1), (2, 2)]) == [2, 4]  # fewer calls than actors
    assert group.call_one(2, "add", 5, 5) == 10
    assert group.call([(1, "add", (0, 1)), (0, "add", (0, 2))]) == [1, 2]
    with pytest.raises(ValueError, match="4 calls for 3 toy actors"):
        group.call_each("add", [(1, 1)] * 4)
    with pytest.raises(KeyError, match="a bug in the method"):  # the method's own error, as is
        group.call_one(0, "fail")
    actors = list(group.actors)
    group.shutdown()
    group.shutdown()
    assert [a.stopped for a in actors] == [1, 1, 1] and len(group) == 0


def test_local_shutdown_goes_on_when_one_actor_fails_to(caplog):
    Toy, Plain = toy_classes()
    group = ActorGroup("toy", local=True)
    group.start(Toy, [(), ()])
    group.start(Plain, [()])
    bad, good = group.actors[0], group.actors[1]

    def stuck() -> None:
        raise RuntimeError("engine stuck")

    bad.shutdown = stuck
    group.shutdown()
    assert good.stopped == 1 and "toy shutdown: engine stuck" in caplog.text


def test_local_constructor_error_is_raised_by_start():
    Toy, _ = toy_classes()
    group = ActorGroup("toy", local=True)
    with pytest.raises(ValueError, match="no model"):
        group.start(Toy, [(), ("", True)])
    assert len(group) == 1  # the one that started is still there for shutdown
    group.shutdown()


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-actors")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_a_killed_actor_is_restarted_prepared_and_its_call_retried(ray_local, caplog):
    ray = ray_local
    Toy, _ = toy_classes()
    prepared = []

    def prepare(actor):
        prepared.append(actor)
        ray.get(actor.set_state.remote("prepared"))

    group = ActorGroup("toy", max_restarts=2, prepare=prepare)
    group.start(Toy, [(), ()], num_cpus=0)
    group.ready()
    old = group.call_all("pid")
    caplog.set_level(logging.WARNING, logger="mopd")
    # Replica 1 dies during its call; Ray restarts it (its constructor again: state "initial").
    threading.Timer(1.0, lambda: ray.kill(group[1], no_restart=False)).start()
    (pid0, state0), (pid1, state1) = group.call_all("work", 3.0)
    assert pid0 == old[0] and state0 == "initial"  # replica 0's call ran once, untouched
    assert pid1 != old[1] and state1 == "prepared"  # retried on the fresh actor, after prepare
    assert prepared == [group[1]] and group.restarts == 1
    assert "toy actor died (work failed" in caplog.text and "toy actor restarted" in caplog.text
    group.shutdown()


@pytest.mark.slow
def test_a_call_that_outlives_max_restarts_raises_naming_the_actor(ray_local):
    ray = ray_local
    Toy, _ = toy_classes()

    def prepare(actor):  # the restarted actor dies again during the retried call
        threading.Timer(1.0, lambda: ray.kill(actor, no_restart=False)).start()

    group = ActorGroup("toy", max_restarts=1, prepare=prepare)
    group.start(Toy, [()], num_cpus=0)
    group.ready()
    threading.Timer(1.0, lambda: ray.kill(group[0], no_restart=False)).start()
    with pytest.raises(ActorFailedError, match=r"^toy replica 0 died during work \(after 1 restarts\): "):
        group.call_one(0, "work", 5.0)
    assert group.restarts == 1
    group.shutdown()


@pytest.mark.slow
def test_without_restarts_a_death_raises_at_once_naming_the_actor(ray_local, caplog):
    ray = ray_local
    Toy, _ = toy_classes()
    group = ActorGroup("toy")  # max_restarts=0: like the trainer's ranks
    group.start(Toy, [(), ()], num_cpus=0, label="rank")
    group.ready()
    threading.Timer(1.0, lambda: ray.kill(group[1], no_restart=False)).start()
    start = time.monotonic()
    # Rank 0 stays busy (as in a collective its dead peer never joins): not waited for.
    with pytest.raises(ActorFailedError, match=r"^toy rank 1 died during work: "):
        group.call_all("work", 120.0)
    assert time.monotonic() - start < 60 and group.restarts == 0
    group.shutdown(timeout_s=1.0)  # rank 0 cannot answer its shutdown call: killed after the timeout
    assert "toy shutdown" in caplog.text and len(group) == 0


@pytest.mark.slow
def test_a_constructor_error_surfaces_in_ready_naming_the_actor(ray_local):
    Toy, _ = toy_classes()
    group = ActorGroup("toy", max_restarts=3)
    group.start(Toy, [(), ("", True)], num_cpus=0)
    with pytest.raises(ActorFailedError, match=r"(?s)^toy replica 1 failed to start: .*no model at this path"):
        group.ready()
    assert len(group) == 0 and group.restarts == 0  # shut down; not counted as a restart


@pytest.mark.slow
def test_shutdown_asks_kills_and_removes_the_placement_group_twice_safely(ray_local, tmp_path):
    ray = ray_local
    from ray.util.placement_group import placement_group, placement_group_table

    Toy, Plain = toy_classes()
    pg = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])
    assert pg.wait(timeout_seconds=60)
    group = ActorGroup("toy", placement_group=pg)
    markers = [tmp_path / "0", tmp_path / "1"]
    group.start(Toy, [(str(markers[0]),)], num_cpus=0.5)
    group.start(Plain, [()], num_cpus=0.5)
    group.ready()
    assert group.call_one(1, "ping") == "pong"
    in_pg = ray.get(
        [a.__ray_call__.remote(lambda self: ray.get_runtime_context().get_placement_group_id()) for a in group.actors]
    )
    assert in_pg == [pg.id.hex()] * 2
    # Each actor's environment: one thread per reserved CPU (at least one).
    env = ray.get(group[0].__ray_call__.remote(lambda self: os.environ.get("OMP_NUM_THREADS")))
    assert env == "1"
    actors = list(group.actors)
    group.shutdown()
    group.shutdown()
    assert markers[0].read_text() == "stopped"  # asked first (Plain has no shutdown: only killed)
    assert placement_group_table(pg)["state"] == "REMOVED" and group.placement_group is None
    for a in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(a.__ray_ready__.remote(), timeout=60)
