"""Where a worker's model lives: the one decision every worker (HF teacher, HF rollout, trainer rank)
takes from its recipe entry.

    device = worker_device(cfg.rollout.resources, "rollout.resources")   # cuda:0 or cpu
    model = load_model(cfg.student, seed).to(device)                     # dtype: the recipe's
    env = deepspeed_env(cfg.trainer.resources)                           # {"DS_ACCELERATOR": ...}

A worker that reserves GPUs (``resources.num_gpus > 0``) runs on the accelerator Ray gave it. Ray
sets ``CUDA_VISIBLE_DEVICES`` per actor to the devices it assigned, so inside an actor that device
is ``cuda:0``; in a plain process (tests, scripts/gpu_check.py) it is the current CUDA device. A
worker without GPUs runs on the CPU, even where CUDA is visible. The dtype stays the recipe's
``dtype`` (``float32`` by default; ``bfloat16`` is the usual choice on a GPU): the device does not
change it, so a recipe gives the same numbers wherever it is placed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mopd.config import ResourcesConfig

if TYPE_CHECKING:
    import torch


def uses_gpu(resources: ResourcesConfig) -> bool:
    """Whether a worker with these resources runs on a GPU (any positive share of one)."""
    return resources.num_gpus > 0


def worker_device(resources: ResourcesConfig, key: str) -> torch.device:
    """The torch device of a worker with ``resources`` (recipe key ``key``, named in errors).

    Raises RuntimeError when the recipe asks for GPUs but this process sees no CUDA device (a CPU
    build of torch, or a Ray actor placed without a GPU)."""
    import torch

    if not uses_gpu(resources):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"{key}.num_gpus={resources.num_gpus:g} but this process sees no CUDA device (torch "
            f"{torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r}); set {key}.num_gpus=0 to run "
            "this worker on the CPU, or run it where a CUDA build of torch sees a GPU"
        )
    # Under Ray the assigned GPU is the only visible one: index 0. In-process: the current device.
    return torch.device("cuda", torch.cuda.current_device())


def deepspeed_env(resources: ResourcesConfig) -> dict[str, str]:
    """DeepSpeed's accelerator for a trainer rank with ``resources``: set before DeepSpeed is
    imported, so that it agrees with ``worker_device`` (on its own it picks CUDA wherever CUDA is
    visible, even for a rank the recipe placed on the CPU)."""
    return {"DS_ACCELERATOR": "cuda" if uses_gpu(resources) else "cpu"}
