"""trainers: the student's training engine.

``TrainerWorker`` is one DeepSpeed rank (usable in-process); ``TrainerPool`` runs
``trainer.world_size`` of them as Ray actors (``TrainerActor``) in a placement group.
"""

from trainers.deepspeed_trainer import TrainerWorker
from trainers.pool import TrainerActor, TrainerPool

__all__ = ["TrainerActor", "TrainerPool", "TrainerWorker"]
