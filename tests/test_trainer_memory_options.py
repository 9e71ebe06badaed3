"""trainer.gradient_checkpointing and trainer.offload_optimizer change where memory goes, not the
update: two steps with each give the weights two plain steps give (in-process rank, CPU).

    pytest tests/test_trainer_memory_options.py
"""

from __future__ import annotations

import pytest

from mopd.config import ConfigError, validate
from test_trainer import make_batch, make_cfg, max_change, worker


def two_steps(zero_stage: int, checkpointing: bool, offload: bool) -> tuple[dict, object]:
    cfg = make_cfg(zero_stage=zero_stage)
    cfg.trainer.gradient_checkpointing, cfg.trainer.offload_optimizer = checkpointing, offload
    w = worker(cfg)
    batch = make_batch(cfg)
    for _ in range(2):
        w.train_step(batch)
    return w.state_dict(), w


def test_checkpointing_and_offload_give_the_same_update():
    base, _ = two_steps(2, checkpointing=False, offload=False)
    ckpt, w_ckpt = two_steps(2, checkpointing=True, offload=False)
    off, w_off = two_steps(2, checkpointing=False, offload=True)
    assert w_ckpt.engine.module.is_gradient_checkpointing
    assert w_off.engine.optimizer.cpu_offload
    # Same arithmetic in another order at most: float32 rounding after two Adam steps (lr 1e-3).
    assert max_change(base, ckpt) < 1e-5
    assert max_change(base, off) < 1e-5


def test_offload_needs_a_partitioned_optimizer():
    cfg = make_cfg(zero_stage=0)
    cfg.trainer.offload_optimizer = True
    with pytest.raises(ConfigError, match="offload_optimizer needs trainer.zero_stage >= 1"):
        validate(cfg)
