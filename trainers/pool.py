"""``TrainerPool``: ``trainer.world_size`` DeepSpeed ranks as Ray actors, one per bundle of the run's
placement group (mopd/dist/placement.py; rank i on ``placement.plan.trainer[i]``), or of a group of its
own when none is given.

The pool (with its ``ActorGroup``, mopd/dist/actors.py) is the only place that touches Ray object refs;
the loop calls plain methods. A step's batch is cut into one ``RankBatch`` per rank
(trainers/shards.py), each put in the object store on its own: a rank fetches only its own rows.

    pool = TrainerPool(cfg, placement)        # or TrainerPool(cfg): a placement group of its own
    metrics = pool.train_step(train_batch)   # rank 0's metrics (already reduced over ranks)
    metrics = pool.sft_step(train_batch)     # supervised step on the response tokens
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
from ray.util.placement_group import placement_group_table

from mopd.config import MOPDConfig
from mopd.dist.actors import ActorGroup
from mopd.dist.devices import deepspeed_env
from mopd.dist.placement import RunPlacement
from mopd.dist.runtime import free_port
from mopd.types import TrainBatch
from trainers.deepspeed_trainer import TrainerWorker
from trainers.shards import shard_batch


def _free_address() -> tuple[str, int]:
    """This node's IP and a port free on it."""
    return ray.util.get_node_ip_address(), free_port("")


_remote_free_address = ray.remote(num_cpus=0)(_free_address)


def _rendezvous(placement: RunPlacement, bundle: int) -> tuple[str, int]:
    """Address for rank 0 (on ``bundle``) to host the process-group rendezvous. Picked here when that
    bundle sits on the driver's node (saves starting a worker process), else by a task on that node."""
    node_of_rank0 = placement_group_table(placement.placement_group)["bundles_to_node_id"].get(bundle)
    if node_of_rank0 == ray.get_runtime_context().get_node_id():
        return _free_address()
    return ray.get(_remote_free_address.options(**placement.options(bundle)).remote())


class TrainerPool:
    """Owns ``cfg.trainer.world_size`` ``TrainerWorker`` ranks; every call goes to all of them.

    placement  the run's placement group (``RunPlacement``); None: the pool reserves one for its
               ranks alone (``placement_timeout_s``, default ``placement.timeout_s``) and removes it
               on shutdown
    """

    def __init__(
        self, cfg: MOPDConfig, placement: RunPlacement | None = None, placement_timeout_s: float | None = None
    ):
        t = cfg.trainer
        self._own_placement: RunPlacement | None = None
        if placement is None:  # fails here, naming what it asked for and what the cluster has
            placement = self._own_placement = RunPlacement.create(cfg, ("trainer",), placement_timeout_s)
        plan = placement.plan
        # Not restarted (max_restarts=0): a dead rank raises ActorFailedError.
        self._actors = ActorGroup("trainer", placement_group=placement.placement_group, owns_placement_group=False)
        self._world_size, self._micro_batch_size = t.world_size, t.micro_batch_size
        self._sp_size = t.sequence_parallel_size  # consecutive ranks that share one data-parallel shard
        self._max_tokens, self._packed = t.max_tokens_per_micro_batch, t.pack_sequences
        # One call on the ranks at a time: the rollout pool may ask for the weights (a restarted
        # replica) from another thread, and ranks must see collectives in the same order.
        self._lock = threading.Lock()
        self._sync_address: tuple[str, int] | None = None
        self._rank0 = (placement, plan.trainer[0])  # where rank 0 runs: it hosts both rendezvous
        try:
            addr, port = _rendezvous(*self._rank0)
            # Threads per reserved CPU, DeepSpeed's accelerator (mopd.dist.devices), then ray.env.
            ranks = [(cfg, rank, t.world_size, addr, port) for rank in range(t.world_size)]
            # Colocated, a rank asks its bundle's device minus the rollout's share (mopd/dist/placement.py).
            res, env = plan.trainer_resources, (deepspeed_env(t.resources), cfg.ray.env)
            self._actors.start(
                TrainerWorker,
                ranks,
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                env=env,
                label="rank",
                bundles=plan.trainer,
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
    def _per_rank(self, method: str, batch: TrainBatch) -> list[Any]:
        """Call ``method`` on every rank with its own shard of ``batch``, each its own object ref
        (with sequence parallelism the ranks of one SP group share the ref of their shard)."""
        dp_size = self._world_size // self._sp_size
        shards = shard_batch(batch, dp_size, self._micro_batch_size, self._max_tokens, self._packed)
        put = [ray.put(shard) for shard in shards]
        refs = [(put[rank // self._sp_size],) for rank in range(self._world_size)]
        with self._lock:  # like _all: ranks must see their collectives in one order
            return self._actors.call_each(method, refs)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self._per_rank("train_step", batch)[0]

    def sft_step(self, batch: TrainBatch) -> dict[str, float]:
        return self._per_rank("sft_step", batch)[0]

    def state_dict(self, adapter: bool = False) -> dict[str, torch.Tensor]:
        return self._all("state_dict", adapter)[0]

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._all("logprobs", ray.put(input_ids), ray.put(attention_mask))[0]

    def host_weight_sync(self) -> tuple[str, int]:
        """Rank 0 hosts the weight-sync group's store (once); its address."""
        if self._sync_address is None:
            self._sync_address = _rendezvous(*self._rank0)
            self._all("host_weight_sync", *self._sync_address)
        return self._sync_address

    def join_weight_sync(self, generation: int, world: int, backend: str) -> None:
        """Rank 0 joins the group's ``generation`` (blocks until the rollout replicas join too)."""
        self._all("join_weight_sync", *self.host_weight_sync(), generation, world, backend)

    def send_weights(self, version: int, bucket_bytes: int, adapter: bool = False) -> int:
        """Rank 0 broadcasts the weights (``adapter``: a LoRA student's adapter alone) to the rollout
        replicas (ZeRO-3 gathers on every rank)."""
        return self._all("send_weights", version, bucket_bytes, adapter)[0]

    def save_checkpoint(self, path: str, client_state: dict[str, Any]) -> None:
        self._all("save_checkpoint", path, client_state)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self._all("load_checkpoint", path)[0]

    def save_hf(self, path: str) -> None:
        self._all("save_hf", path)

    def get_version(self) -> int:
        return self._all("get_version")[0]

    def shutdown(self) -> None:
        """Kill the ranks and release a placement group of the pool's own. Safe to call twice."""
        self._actors.shutdown()
        if self._own_placement is not None:
            self._own_placement.shutdown()


__all__ = ["TrainerPool"]
