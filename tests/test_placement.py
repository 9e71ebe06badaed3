"""The run's one placement group (mopd/dist/placement.py) and taking turns (``placement.layout:
colocated``).

Without Ray: the bundles of both layouts, the cluster-size check, the recipe checks. With a local
Ray: a group the cluster cannot hold fails at once (before any actor starts) naming what was asked
and what the cluster has, one held by other work after ``placement.timeout_s``; and two short
real runs of recipes/tiny.yaml through ``run_training``, one per layout: one placement group for
the run, every actor on its bundle by Ray's own records (rollout replica i on trainer rank i's when
colocated), the rollout asleep whenever the trainer steps and awake for the weight sync after.

    OMP_NUM_THREADS=1 pytest tests/test_placement.py
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from mopd.config import ConfigError, load_config
from mopd.dist.placement import PlacementError, plan_placement, shortfall
from mopd.metrics import read_metrics

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
CPU1 = {"CPU": 1.0}


def cfg_of(*overrides: str):
    return load_config(TINY, list(overrides))


def asks_fit_their_bundles(plan) -> None:
    """What the actors on each bundle ask for adds up to at most the bundle (else Ray cannot start them)."""
    asked = [dict.fromkeys(b, 0.0) for b in plan.bundles]
    per_actor = [(i, plan.trainer_resources) for i in plan.trainer]
    per_actor += [(i, plan.rollout_resources) for i in plan.rollout]
    for i, res in per_actor:
        asked[i]["CPU"] += res.num_cpus
        if res.num_gpus:
            asked[i]["GPU"] += res.num_gpus
    for i in plan.trainer + plan.rollout:
        for key, value in asked[i].items():
            assert value <= plan.bundles[i].get(key, 0.0) + 1e-9, (i, asked[i], plan.bundles[i])


# --------------------------------------------------------------------------- the plan (no Ray)


def test_disaggregated_gives_every_actor_a_bundle_of_its_own_resources():
    cfg = cfg_of("trainer.world_size=2", "rollout.resources.num_cpus=2", "teachers.math.replicas=2")
    plan = plan_placement(cfg)
    assert plan.bundles == [CPU1, CPU1, {"CPU": 2.0}, CPU1, CPU1, CPU1]
    assert plan.trainer == [0, 1] and plan.rollout == [2]
    assert plan.teachers == {"code": [3], "math": [4, 5]}
    assert plan.trainer_resources == cfg.trainer.resources and plan.rollout_resources == cfg.rollout.resources
    assert plan.describe() == (
        "trainer ranks: 2 x {'CPU': 1.0}; rollout replicas: 1 x {'CPU': 2.0}; "
        "teacher 'code': 1 x {'CPU': 1.0}; teacher 'math': 2 x {'CPU': 1.0}"
    )


def test_colocated_puts_rollout_replica_i_on_trainer_rank_i_and_splits_its_gpu():
    cfg = cfg_of(
        "placement.layout=colocated", "trainer.world_size=2", "rollout.replicas=2",
        "trainer.resources.num_gpus=1", "trainer.resources.num_cpus=4", "rollout.resources.num_gpus=0.25",
        "teachers.math.resources.num_gpus=1",
    )  # fmt: skip
    plan = plan_placement(cfg)
    # The trainer's device and both actors' CPUs per shared bundle; teachers on their own.
    shared = {"CPU": 5.0, "GPU": 1.0}
    assert plan.bundles == [shared, shared, CPU1, {"CPU": 1.0, "GPU": 1.0}]
    assert plan.rollout == plan.trainer == [0, 1]
    assert plan.teachers == {"code": [2], "math": [3]}
    assert (plan.trainer_resources.num_cpus, plan.trainer_resources.num_gpus) == (4.0, 0.75)
    assert (plan.rollout_resources.num_cpus, plan.rollout_resources.num_gpus) == (1.0, 0.25)
    asks_fit_their_bundles(plan)
    assert plan.describe().startswith("trainer ranks + rollout replicas: 2 x {'CPU': 5.0, 'GPU': 1.0}; teacher")


def test_colocated_on_cpu_shares_the_bundle_cpus_added():
    plan = plan_placement(cfg_of("placement.layout=colocated", "trainer.world_size=2", "rollout.replicas=2"))
    assert plan.bundles[:2] == [{"CPU": 2.0}, {"CPU": 2.0}] and plan.rollout == plan.trainer == [0, 1]
    asks_fit_their_bundles(plan)


def test_a_trainer_placed_alone_plans_only_its_ranks_with_their_whole_resources():
    cfg = cfg_of(
        "placement.layout=colocated", "trainer.resources.num_gpus=1", "rollout.resources.num_gpus=0.5"
    )  # fmt: skip
    plan = plan_placement(cfg, ("trainer",))
    assert plan.bundles == [{"CPU": 1.0, "GPU": 1.0}] and plan.rollout == [] and plan.teachers == {}
    assert plan.trainer_resources.num_gpus == 1.0


def test_shortfall_names_what_the_cluster_lacks():
    nodes = [{"CPU": 8.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 4.0}]
    assert shortfall([{"CPU": 4.0, "GPU": 4.0}] * 2, nodes) == []
    assert shortfall([{"CPU": 4.0, "GPU": 4.0}] * 3, nodes) == ["12 GPU asked, the cluster has 8"]
    assert shortfall([{"CPU": 1.0, "GPU": 5.0}], nodes) == ["no node can hold a bundle of {'CPU': 1.0, 'GPU': 5.0}"]
    assert shortfall([{"CPU": 1.0, "GPU": 1.0}], [{"CPU": 2.0}]) == [
        "1 GPU asked, the cluster has 0",
        "no node can hold a bundle of {'CPU': 1.0, 'GPU': 1.0}",
    ]


# --------------------------------------------------------------------------- recipe checks


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.world_size=2"], r"rollout.replicas \(1\) must equal trainer.world_size \(2\)"),
        (["rollout.overlap=true"], r"rollout.overlap=true cannot work with placement.layout=colocated"),
        (["rollout.resources.num_gpus=1"], r"trainer.resources.num_gpus is 0, so rollout.resources.num_gpus \(1.0\)"),
        (["trainer.resources.num_gpus=2", "rollout.resources.num_gpus=1"], r"num_gpus \(2.0\) must be at most 1"),
        (
            ["trainer.resources.num_gpus=1", "rollout.resources.num_gpus=1"],
            r"rollout.resources.num_gpus \(1.0\) is the rollout's share .* e.g. rollout.resources.num_gpus=0.5",
        ),
    ],
)
def test_colocated_refuses_what_cannot_take_turns(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg_of("placement.layout=colocated", *overrides)


def test_disaggregated_accepts_what_colocated_refuses():
    cfg_of("trainer.world_size=2", "rollout.overlap=true", "rollout.resources.num_gpus=1")


# --------------------------------------------------------------------------- taking turns (no Ray)


def record_calls(obj, name: str, events: list) -> None:
    """Append ``name`` to ``events`` whenever ``obj.name(...)`` is called (then run it)."""
    real = getattr(obj, name)

    def call(*args, **kwargs):
        events.append(name)
        return real(*args, **kwargs)

    setattr(obj, name, call)


def test_the_loop_puts_the_rollout_to_sleep_for_the_train_phase_and_wakes_it_before_the_sync(tmp_path):
    from mopd.app.run import build_mixer
    from mopd.loop import MOPDLoop
    from mopd.metrics import MetricsWriter
    from rollout.pool import RolloutPool
    from teachers.pool import TeacherPool

    cfg = cfg_of(f"run.output_dir={tmp_path}", "placement.layout=colocated", "rollout.max_new_tokens=4")
    rollout, events = RolloutPool(cfg, local=True), []
    actor = rollout._actors[0]
    for name in ("generate", "sleep", "wake", "sync_weights"):
        record_calls(rollout, name, events)

    class Trainer:  # the rollout's own weights back: sync_weights loads them (and raises if asleep)
        def train_step(self, batch):
            events.append(("train", rollout.asleep()))
            return {"train/loss": 0.0, "train/skipped": 0.0}

        def state_dict(self):
            return actor.model.state_dict()

    mixer, _ = build_mixer(cfg)
    teachers = TeacherPool(cfg.teachers, 0, local=True)
    loop = MOPDLoop(cfg, rollout, teachers, Trainer(), mixer, MetricsWriter(tmp_path, tensorboard=False))
    metrics = [loop.train_one_step() for _ in range(2)]
    assert events == ["generate", "sleep", ("train", [True]), "wake", "sync_weights"] * 2
    assert (actor.sleeps, actor.wakes, actor.asleep()) == (2, 2, False)
    assert all("timing/rollout_sleep" in m and "timing/rollout_wake" in m for m in metrics)
    actor.sleep()
    actor.sleep()  # idempotent: counted once
    with pytest.raises(RuntimeError, match=r"rollout generate while the replica is asleep .* call wake\(\) first"):
        actor.generate(mixer.next_batch(1), n=1, seed=0)
    with pytest.raises(RuntimeError, match="rollout load_weights while the replica is asleep"):
        actor.load_weights(actor.model.state_dict(), 3)
    actor.wake()
    assert (actor.sleeps, actor.wakes) == (3, 3) and len(actor.generate(mixer.next_batch(1), n=1, seed=0)) == 1


# --------------------------------------------------------------------------- with Ray

NUM_CPUS = 6  # the colocated run below: 2 bundles of 2 CPUs (rank + replica) and 2 teachers


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False, namespace="test-placement")
    yield ray
    ray.shutdown()


def live_groups(ray) -> dict[str, dict]:
    from ray.util.placement_group import placement_group_table

    return {k: v for k, v in placement_group_table().items() if v["state"] != "REMOVED"}


@pytest.mark.slow
def test_a_group_the_cluster_cannot_hold_fails_at_once_before_any_actor(ray_local, tmp_path, monkeypatch):
    from mopd.app.run import run_training
    from mopd.dist.actors import ActorGroup

    started = []
    monkeypatch.setattr(ActorGroup, "start", lambda self, *a, **k: started.append(self.kind))
    cfg = cfg_of(f"run.output_dir={tmp_path}", "teachers.math.replicas=8", "placement.timeout_s=600")
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        run_training(cfg)
    assert time.monotonic() - t0 < 120, "waited for a group the cluster can never hold (timeout 600 s)"
    msg = str(err.value)
    assert f"11 CPU asked, the cluster has {NUM_CPUS}" in msg
    assert "trainer ranks: 1 x {'CPU': 1.0}; rollout replicas: 1 x {'CPU': 1.0}" in msg
    assert "teacher 'math': 8 x {'CPU': 1.0}" in msg and f"The cluster has {{'CPU': {NUM_CPUS}.0}}" in msg
    assert started == [] and live_groups(ray_local) == {}


@pytest.mark.slow
def test_a_group_others_hold_the_resources_of_fails_after_the_timeout(ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    from mopd.dist.placement import RunPlacement

    other = placement_group([{"CPU": NUM_CPUS - 1}])
    assert other.wait(30)
    try:
        with pytest.raises(PlacementError, match=r"not placed within 1s .* Asked: trainer ranks: 1 x \{'CPU': 1.0\}"):
            RunPlacement.create(cfg_of("placement.timeout_s=1"))
    finally:
        remove_placement_group(other)
    assert live_groups(ray_local) == {}


def bundle_in_ray(ray, actor) -> int:
    """The placement group bundle Ray scheduled ``actor`` on, from the GCS actor table (its resources
    are named ``CPU_group_<bundle>_<group id>``)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    info = gcs_pb2.ActorTableData.FromString(state._connect_and_get_accessor().get_actor_info(actor._actor_id))
    found = {int(m.group(1)) for k in info.required_resources if (m := re.fullmatch(r"CPU_group_(\d+)_\w+", k))}
    assert len(found) == 1, dict(info.required_resources)
    return found.pop()


def run_observed(ray, tmp_path, *overrides):
    """Two steps of recipes/tiny.yaml through ``run_training``; returns what was seen while it ran
    (groups, bundles, the rollout's sleep state during each train step) and the metrics."""
    from mopd.app.run import run_training
    from mopd.loop import MOPDLoop

    cfg = cfg_of(f"run.output_dir={tmp_path}", "run.total_steps=2", "checkpoint.every=0", *overrides)
    seen: dict = {"asleep_in_train": [], "turns": []}
    real_step = MOPDLoop.train_one_step

    def observed_step(loop):
        if not seen.get("groups"):
            seen["groups"] = live_groups(ray)
            for role, pool in (("trainer", loop.trainer), ("rollout", loop.rollout), ("teachers", loop.teachers)):
                actors = pool._actors
                seen[role] = [(actors.bundles[i], bundle_in_ray(ray, a)) for i, a in enumerate(actors.actors)]
            real_train = loop.trainer.train_step

            def train_step(batch):
                seen["asleep_in_train"].append(loop.rollout.asleep())
                return real_train(batch)

            loop.trainer.train_step = train_step
        out = real_step(loop)
        turns = [ray.get(a.__ray_call__.remote(lambda self: (self.sleeps, self.wakes))) for a in loop.rollout._actors]
        seen["turns"].append(turns)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MOPDLoop, "train_one_step", observed_step)
        run_training(cfg)
    seen["after"] = live_groups(ray)
    return seen, [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]


def check_trained(records) -> None:
    assert [r["policy_version"] for r in records] == [1.0, 2.0]
    # Each batch came from the weights synced after the step before (after the wake, colocated).
    assert [r["rollout/policy_version"] for r in records] == [0.0, 1.0]
    assert all(r["train/train_rollout_abs_diff"] < 1e-4 for r in records)


@pytest.mark.slow
# ~25 s; every default end-to-end run (test_faults, test_train_e2e) reserves its disaggregated group,
# and test_disaggregated_gives_every_actor_a_bundle_of_its_own_resources checks the bundles
@pytest.mark.extended
def test_disaggregated_run_uses_one_group_with_a_bundle_per_actor(ray_local, tmp_path):
    seen, records = run_observed(ray_local, tmp_path)
    [group] = seen["groups"].values()  # exactly one group for the run
    assert group["bundles"] == {i: {"CPU": 1.0} for i in range(4)} and group["strategy"] == "PACK"
    # (bundle the pool asked for, bundle Ray put the actor on): trainer, rollout, teachers code, math
    assert seen["trainer"] == [(0, 0)] and seen["rollout"] == [(1, 1)] and seen["teachers"] == [(2, 2), (3, 3)]
    assert seen["after"] == {}, "the run's group outlived it"
    check_trained(records)
    assert seen["asleep_in_train"] == [[False], [False]] and seen["turns"] == [[(0, 0)], [(0, 0)]]  # no turns
    assert not any("timing/rollout_sleep" in r for r in records)


@pytest.mark.slow
def test_colocated_run_shares_bundles_and_the_rollout_sleeps_while_the_trainer_steps(ray_local, tmp_path):
    seen, records = run_observed(
        ray_local, tmp_path, "placement.layout=colocated", "trainer.world_size=2", "rollout.replicas=2"
    )
    [group] = seen["groups"].values()
    assert group["bundles"] == {0: {"CPU": 2.0}, 1: {"CPU": 2.0}, 2: {"CPU": 1.0}, 3: {"CPU": 1.0}}
    # Rollout replica i on trainer rank i's bundle, as the pools asked and as Ray placed them.
    assert seen["trainer"] == [(0, 0), (1, 1)] and seen["rollout"] == [(0, 0), (1, 1)]
    assert seen["teachers"] == [(2, 2), (3, 3)]
    assert seen["after"] == {}
    # Asleep whenever the trainer stepped; one sleep and one wake per step; awake for the sync
    # (a load_weights while asleep raises) and the next generate.
    assert seen["asleep_in_train"] == [[True, True], [True, True]]
    assert seen["turns"] == [[(1, 1), (1, 1)], [(2, 2), (2, 2)]]
    check_trained(records)
    assert all(r["timing/rollout_sleep"] >= 0 and r["timing/rollout_wake"] >= 0 for r in records)
