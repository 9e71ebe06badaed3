"""trainers: the student's training engine.

``TrainerWorker`` is one DeepSpeed rank (usable in-process); ``TrainerPool`` runs
``trainer.world_size`` of them as Ray actors in a placement group.
Importing this package is light: DeepSpeed and Ray load only when a name below is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainerWorker": "trainers.deepspeed_trainer",
    "TrainerPool": "trainers.pool",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
