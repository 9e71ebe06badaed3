"""The rollout backend contract: what ``RolloutPool`` calls on a replica, and the table of backends.

    cls = actor_class(cfg.rollout.backend)   # the plain class; the pool makes it a Ray actor
    worker = cls(cfg, 0)                     # RolloutWorker (in-process: RolloutPool(cfg, local=True))

A backend is a class in ``rollout/<name>.py`` that satisfies ``RolloutBackend`` (its constructor
builds a ``RolloutWorker``), plus one line in ``ROLLOUT_BACKENDS``. The module states the contract
for mypy at its end (copy ``rollout/hf.py``):

    if TYPE_CHECKING:
        _backend: RolloutBackend = SGLangRolloutActor     # its constructor

        def _conforms(actor: SGLangRolloutActor) -> RolloutWorker:  # its methods, named where they differ
            return actor

The table names classes by ``"module:Class"``, so importing it loads no backend (vLLM is optional
and heavy). ``sleep`` / ``wake`` / ``asleep`` come with ``rollout.turns.TakesTurns``,
``join_weight_sync`` / ``receive_weights`` with ``rollout.sync_member.SyncGroupMember``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from mopd.dist.lazy import lazy_exports

if TYPE_CHECKING:
    import torch

    from mopd.config import MOPDConfig
    from mopd.types import PromptRow, RolloutBatch

# rollout.backend -> "module:Class". Keep the names in step with ``Backend`` in mopd/config.py (the
# recipe's schema, which the core cannot take from here); tests/test_rollout.py checks they agree.
ROLLOUT_BACKENDS: Mapping[str, str] = {
    "hf": "rollout.hf:HFRolloutActor",
    "vllm": "rollout.vllm:VLLMRolloutActor",
}


class RolloutWorker(Protocol):
    """One rollout replica: every method ``RolloutPool`` calls on it (through Ray or in-process).

    Inputs and results cross the actor boundary on the CPU."""

    @staticmethod
    def backend_env(num_gpus: float) -> Mapping[str, str]:
        """Environment variables the replica's Ray actor starts with (before ``ray.env``), given
        ``rollout.resources.num_gpus``; read by the pool before the actor exists."""
        ...

    def generate(self, rows: list[PromptRow], n: int, seed: int, greedy: bool = False) -> RolloutBatch:
        """n samples of each prompt, seeded by ``seed``: trajectory i*n + k is sample k of rows[i]
        (group id i), stamped with the current policy version. ``greedy``: argmax decoding."""
        ...

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """The trainer's ``model.state_dict()`` (CPU tensors) as policy ``version``; strict on names.
        A replica whose ``takes_adapter()`` is True gets a LoRA student's adapter alone instead."""
        ...

    def takes_adapter(self) -> bool:
        """Whether the weight syncs send this replica a LoRA student's adapter alone (served over
        the base it loaded at start, ``rollout.lora_sync``) rather than whole weights."""
        ...

    def join_weight_sync(self, host: str, port: int, generation: int, rank: int, world: int, backend: str) -> None:
        """Join ``generation`` of the weight-sync group as ``rank`` of ``world`` (``rollout.weight_sync:
        direct``); blocks until every member has joined."""
        ...

    def receive_weights(self, version: int) -> int:
        """Receive policy ``version`` from trainer rank 0's broadcast; returns the version."""
        ...

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) f32 teacher-forced log-probs at temperature 1 under the current weights; 0 at
        padding. input_ids (B, T) int64, attention_mask (B, T)."""
        ...

    def sleep(self) -> None:
        """Free the device memory (``placement.layout: colocated``, while the trainer steps)."""
        ...

    def wake(self) -> None:
        """Take the device memory back (before the weight sync and the next generate)."""
        ...

    def asleep(self) -> bool:
        """Whether the replica is asleep (``sleep`` called, ``wake`` not yet)."""
        ...

    def version(self) -> int:
        """The policy version of the weights loaded now (0: the initial student)."""
        ...

    def pad_token_id(self) -> int:
        """The student tokenizer's pad id (the pool pads merged batches with it)."""
        ...

    def env_metrics(self) -> dict[str, float]:
        """Fault counters of the replica's tool-environment pools so far (``faults/env_restarts``,
        ``faults/env_wedged``); empty before a multi-turn domain was rolled out."""
        ...

    def shutdown(self) -> None:
        """Release the engine; the pool calls it once before the actor goes."""
        ...


class RolloutBackend(Protocol):
    """A rollout backend class: ``cls(cfg, replica)`` builds a worker (the pool's only call)."""

    def __call__(self, cfg: MOPDConfig, replica: int) -> RolloutWorker: ...


def actor_class(backend: str) -> type[RolloutWorker]:
    """The plain actor class of ``backend`` (its module imported now: vLLM is optional)."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"rollout.backend is {backend!r}; valid: {', '.join(ROLLOUT_BACKENDS)}")
    module, _, name = ROLLOUT_BACKENDS[backend].partition(":")
    return lazy_exports("rollout", {name: module})(name)
