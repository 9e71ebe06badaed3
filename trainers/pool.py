"""``TrainerPool``: ``trainer.world_size`` DeepSpeed ranks as Ray actors in one placement group.

The pool (with its ``ActorGroup``, mopd/actors.py) is the only place that touches Ray object refs;
the loop calls plain methods:

    pool = TrainerPool(cfg)
    metrics = pool.train_step(train_batch)   # rank 0's metrics (already reduced over ranks)
    weights = pool.state_dict()              # full state dict of rank 0 (rollout.weight_sync=driver)
    pool.send_weights(version, bucket_bytes) # rank 0 broadcasts to the rollout (=direct; see RolloutPool)
    pool.shutdown()

Ranks are not restarted: their DeepSpeed state and process group cannot be rebuilt mid-run. A rank
that dies raises ``ActorFailedError`` naming it, without waiting on the ranks left hanging in a
collective; the run then stops and continues with ``--resume``.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mopd.actors import ActorGroup
from mopd.config import MOPDConfig, ResourcesConfig
from mopd.runtime import free_port
from mopd.types import TrainBatch
from trainers.deepspeed_trainer import TrainerWorker


def _free_address() -> tuple[str, int]:
    """This node's IP and a port free on it."""
    return ray.util.get_node_ip_address(), free_port("")


_remote_free_address = ray.remote(num_cpus=0)(_free_address)


def _rendezvous(pg) -> tuple[str, int]:
    """Address for rank 0 (bundle 0) to host the process-group rendezvous. Picked here when bundle 0
    sits on the driver's node (saves starting a worker process), else by a task on that node."""
    node_of_bundle0 = placement_group_table(pg)["bundles_to_node_id"].get(0)
    if node_of_bundle0 == ray.get_runtime_context().get_node_id():
        return _free_address()
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
    return ray.get(_remote_free_address.options(scheduling_strategy=strategy).remote())


def _bundle(res: ResourcesConfig) -> dict[str, float]:
    bundle = {"CPU": float(res.num_cpus)}
    if res.num_gpus > 0:
        bundle["GPU"] = float(res.num_gpus)
    return bundle


class TrainerPool:
    """Owns ``cfg.trainer.world_size`` ``TrainerWorker`` ranks; every call goes to all of them."""

    def __init__(self, cfg: MOPDConfig, placement_timeout_s: float = 120.0):
        t = cfg.trainer
        bundles = [_bundle(t.resources) for _ in range(t.world_size)]
        pg = placement_group(bundles, strategy="PACK")
        if not pg.wait(timeout_seconds=placement_timeout_s):
            remove_placement_group(pg)
            raise RuntimeError(
                f"trainer placement group not satisfied within {placement_timeout_s:.0f}s: requested "
                f"{t.world_size} x {bundles[0]} (trainer.world_size x trainer.resources); cluster has "
                f"{ray.cluster_resources()}, available {ray.available_resources()}"
            )
        # Rank i in bundle i; not restarted (max_restarts=0): a dead rank raises ActorFailedError.
        self._actors = ActorGroup("trainer", placement_group=pg)  # removes the placement group on shutdown
        # One call on the ranks at a time: the rollout pool may ask for the weights (a restarted
        # replica) from another thread, and ranks must see collectives in the same order.
        self._lock = threading.Lock()
        self._sync_address: tuple[str, int] | None = None
        try:
            addr, port = _rendezvous(pg)
            # Threads per reserved CPU, DeepSpeed's CPU accelerator without a GPU, then ray.env.
            accelerator_env = {"DS_ACCELERATOR": "cpu"} if t.resources.num_gpus == 0 else {}
            ranks = [(cfg, rank, t.world_size, addr, port) for rank in range(t.world_size)]
            res, env = t.resources, (accelerator_env, cfg.ray.env)
            self._actors.start(
                TrainerWorker, ranks, num_cpus=res.num_cpus, num_gpus=res.num_gpus, env=env, label="rank"
            )
            # Surfaces constructor errors (bad model config, DeepSpeed init) here rather than later.
            self._actors.ready()
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every rank (the same arguments) and return all results, rank order."""
        with self._lock:
            return self._actors.call_all(method, *args)

    # ------------------------------------------------------------------ forwarded calls
    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        ref = ray.put(batch)  # once, not once per rank
        return self._all("train_step", ref)[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._all("state_dict")[0]

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._all("logprobs", ray.put(input_ids), ray.put(attention_mask))[0]

    def host_weight_sync(self) -> tuple[str, int]:
        """Rank 0 hosts the weight-sync group's store (once); its address."""
        if self._sync_address is None:
            self._sync_address = _rendezvous(self._actors.placement_group)
            self._all("host_weight_sync", *self._sync_address)
        return self._sync_address

    def join_weight_sync(self, generation: int, world: int, backend: str) -> None:
        """Rank 0 joins the group's ``generation`` (blocks until the rollout replicas join too)."""
        self._all("join_weight_sync", *self.host_weight_sync(), generation, world, backend)

    def send_weights(self, version: int, bucket_bytes: int) -> int:
        """Rank 0 broadcasts the weights to the rollout replicas (ZeRO-3 gathers on every rank)."""
        return self._all("send_weights", version, bucket_bytes)[0]

    def save_checkpoint(self, path: str, client_state: dict[str, Any]) -> None:
        self._all("save_checkpoint", path, client_state)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self._all("load_checkpoint", path)[0]

    def save_hf(self, path: str) -> None:
        self._all("save_hf", path)

    def get_version(self) -> int:
        return self._all("get_version")[0]

    def set_version(self, version: int) -> None:
        self._all("set_version", version)

    def shutdown(self) -> None:
        """Kill the ranks and release the placement group. Safe to call twice."""
        self._actors.shutdown()


__all__ = ["TrainerPool"]
