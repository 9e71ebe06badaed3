"""trainers: the student's training engine.

``TrainerWorker`` is one DeepSpeed rank (usable in-process); ``TrainerPool`` runs
``trainer.world_size`` of them as Ray actors in a placement group.
Importing this package is light: DeepSpeed and Ray load only when a name below is used.
"""

from __future__ import annotations

from mopd.dist.lazy import lazy_exports

_EXPORTS = {
    "TrainerWorker": "trainers.deepspeed_trainer",
    "TrainerPool": "trainers.pool",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports("trainers", _EXPORTS)
