"""The run's one Ray placement group: a bundle for every actor of the run, reserved before any
actor starts, laid out as ``placement.layout`` says (mopd/config.py).

    plan = plan_placement(cfg)            # pure: the bundles and which bundle each actor uses
    placement = RunPlacement.create(cfg)  # the group, ready; PlacementError naming what is missing
    TrainerPool(cfg, placement)           # each pool starts its actors on its own bundles
    placement.shutdown()                  # removes the group

- ``disaggregated``: one bundle per trainer rank, then one per rollout replica, then one per
  teacher replica (domains in sorted order), each holding that actor's ``resources``.
- ``colocated``: rollout replica i sits in trainer rank i's bundle, which holds the rank's
  resources plus the rollout's CPUs. Ray gives both actors the bundle's device by splitting its
  GPU fraction: the rollout asks ``rollout.resources.num_gpus`` (e.g. 0.5), the rank the rest. The
  two take turns on the device (``MOPDLoop``: the rollout sleeps while the trainer steps); how its
  memory is shared is the engines' business (e.g. vLLM's ``gpu_memory_utilization``). Teachers
  keep bundles of their own.

A group the cluster cannot hold at all (more of a resource than all its nodes have, or a bundle
larger than any node) fails at once; one whose resources are held by other work is waited for
``placement.timeout_s``. Both errors name what was asked and what the cluster has. The plan is
pure; Ray is imported only by ``RunPlacement``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mopd.config import MOPDConfig, ResourcesConfig, teacher_groups

log = logging.getLogger(__name__)

ROLES = ("trainer", "rollout", "teachers")


class PlacementError(RuntimeError):
    """The run's placement group cannot be placed; the message names what was asked and what the
    cluster has."""


@dataclass(frozen=True)
class PlacementPlan:
    """The bundles of the run's placement group and which bundle each actor uses.

    bundles   Ray resource dicts in group order, e.g. ``{"CPU": 2.0, "GPU": 1.0}``
    trainer   bundle index of each trainer rank
    rollout   bundle index of each rollout replica (a trainer rank's bundle when colocated)
    teachers  teacher worker group (a domain, or adapter teachers "code+math") -> bundle of each replica
    trainer_resources, rollout_resources  what each rank / replica asks of its bundle
    """

    layout: str
    bundles: list[dict[str, float]]
    trainer: list[int] = field(default_factory=list)
    rollout: list[int] = field(default_factory=list)
    teachers: dict[str, list[int]] = field(default_factory=dict)
    trainer_resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    rollout_resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def describe(self) -> str:
        """What the group asks for, per role, e.g. ``trainer ranks: 2 x {'CPU': 1.0}; ...``."""
        shared = bool(self.rollout) and self.rollout == self.trainer  # colocated
        parts = []
        if self.trainer:
            parts.append(f"trainer ranks{' + rollout replicas' if shared else ''}: {self._count(self.trainer)}")
        if self.rollout and not shared:
            parts.append(f"rollout replicas: {self._count(self.rollout)}")
        parts += [f"teacher '{d}': {self._count(idx)}" for d, idx in sorted(self.teachers.items())]
        return "; ".join(parts)

    def _count(self, indices: Sequence[int]) -> str:
        """``n x {bundle}``: the bundles of one role are alike."""
        return f"{len(indices)} x {self.bundles[indices[0]]}"


def bundle(res: ResourcesConfig, extra_cpus: float = 0.0) -> dict[str, float]:
    """A Ray bundle for ``res`` (a GPU entry only when it asks for GPUs) plus ``extra_cpus``."""
    out = {"CPU": float(res.num_cpus) + float(extra_cpus)}
    if res.num_gpus > 0:
        out["GPU"] = float(res.num_gpus)
    return out


def plan_placement(cfg: MOPDConfig, roles: Sequence[str] = ROLES) -> PlacementPlan:
    """The bundles of the roles in ``roles`` (a pool placed on its own plans only its role) in
    ``placement.layout``; colocation needs both the trainer and the rollout in ``roles``."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; valid: {', '.join(ROLES)}")
    t, r = cfg.trainer, cfg.rollout
    colocated = cfg.placement.layout == "colocated" and "trainer" in roles and "rollout" in roles
    bundles: list[dict[str, float]] = []

    def add(res: ResourcesConfig, n: int, extra_cpus: float = 0.0) -> list[int]:
        bundles.extend(bundle(res, extra_cpus) for _ in range(n))
        return list(range(len(bundles) - n, len(bundles)))

    trainer_res, rollout_res = t.resources, r.resources
    trainer: list[int] = []
    rollout: list[int] = []
    if colocated:
        trainer = add(t.resources, t.world_size, extra_cpus=r.resources.num_cpus)
        rollout = list(trainer[: r.replicas])  # validate: replicas == world_size
        # The rank leaves the rollout's fraction of the device (config._check_placement).
        trainer_res = ResourcesConfig(t.resources.num_cpus, t.resources.num_gpus - r.resources.num_gpus)
    else:
        trainer = add(t.resources, t.world_size) if "trainer" in roles else []
        rollout = add(r.resources, r.replicas) if "rollout" in roles else []
    teachers: dict[str, list[int]] = {}
    if "teachers" in roles:
        for g in teacher_groups(cfg.teachers):  # adapter teachers of one base: one worker group
            teachers[g.name] = add(g.cfg.resources, g.cfg.replicas)
    return PlacementPlan(cfg.placement.layout, bundles, trainer, rollout, teachers, trainer_res, rollout_res)


def shortfall(bundles: Sequence[Mapping[str, float]], nodes: Sequence[Mapping[str, float]]) -> list[str]:
    """Why ``bundles`` can never be placed on nodes with these total resources ([] if they may
    be): a resource asked for beyond the cluster's total, or a bundle no single node can hold."""
    reasons = []
    for key in sorted({k for b in bundles for k in b}):
        asked, has = sum(b.get(key, 0.0) for b in bundles), sum(n.get(key, 0.0) for n in nodes)
        if asked > has + 1e-9:
            reasons.append(f"{asked:g} {key} asked, the cluster has {has:g}")
    for b in {tuple(sorted(b.items())) for b in bundles}:
        if not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in b) for n in nodes):
            reasons.append(f"no node can hold a bundle of {dict(b)}")
    return reasons


class RunPlacement:
    """The run's placement group, ready, and its plan. ``options(bundle)`` gives the Ray actor
    options that put an actor on one bundle; ``shutdown`` removes the group (safe twice)."""

    def __init__(self, plan: PlacementPlan, placement_group: Any) -> None:
        self.plan, self.placement_group = plan, placement_group

    @classmethod
    def create(cls, cfg: MOPDConfig, roles: Sequence[str] = ROLES, timeout_s: float | None = None) -> RunPlacement:
        """Reserve the bundles of ``plan_placement(cfg, roles)`` in one PACK group (one node when
        it fits, else spread over as few as possible) and wait until Ray has placed them."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        plan = plan_placement(cfg, roles)
        timeout = cfg.placement.timeout_s if timeout_s is None else timeout_s
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        reasons = shortfall(plan.bundles, nodes)
        if reasons:
            raise PlacementError(
                f"the run's placement group ({plan.layout}) cannot be placed on this cluster: "
                f"{'; '.join(reasons)}. Asked: {plan.describe()}. {_cluster()}. Lower the resources or "
                "replicas in the recipe, or add nodes"
            )
        pg = placement_group(plan.bundles, strategy="PACK", name=f"mopd-{cfg.run.name}")
        if not pg.wait(timeout_seconds=timeout):
            remove_placement_group(pg)
            raise PlacementError(
                f"the run's placement group ({plan.layout}) was not placed within {timeout:g}s (other work "
                f"holds the resources; placement.timeout_s sets the wait). Asked: {plan.describe()}. {_cluster()}"
            )
        log.info("placement group (%s): %s", plan.layout, plan.describe())
        return cls(plan, pg)

    def options(self, bundle_index: int) -> dict[str, Any]:
        """Ray actor options that start an actor on bundle ``bundle_index`` of the group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group, placement_group_bundle_index=bundle_index
        )
        return {"scheduling_strategy": strategy}

    def shutdown(self) -> None:
        """Remove the group (after the pools have shut their actors down). Safe to call twice."""
        pg, self.placement_group = self.placement_group, None
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)


def _cluster() -> str:
    """The cluster's schedulable resources, total and available (without Ray's internal ones)."""
    import ray

    def shown(resources: Mapping[str, float]) -> dict[str, float]:
        hidden = ("node:", "memory", "object_store_memory", "accelerator_type:")
        return {k: v for k, v in sorted(resources.items()) if not k.startswith(hidden) and "_group_" not in k}

    return f"The cluster has {shown(ray.cluster_resources())}, available now {shown(ray.available_resources())}"
