"""Device placement (mopd/dist/devices.py): a worker runs on a GPU exactly when its recipe entry
reserves one, and says which recipe key to change when it cannot.

    pytest tests/test_devices.py        # CPU; CUDA's presence is faked with monkeypatch
"""

from __future__ import annotations

import pytest
import torch

from mopd.config import ModelConfig, MOPDConfig, ResourcesConfig, TeacherConfig
from mopd.dist.devices import deepspeed_env, worker_device
from mopd.models import tiny_mimo_config


@pytest.fixture
def fake_cuda(monkeypatch):
    """A process that sees CUDA device 0 (no tensor is ever put there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_worker_without_gpus_runs_on_the_cpu_even_where_cuda_is_visible(fake_cuda):
    assert worker_device(ResourcesConfig(num_cpus=2, num_gpus=0), "rollout.resources") == torch.device("cpu")
    assert deepspeed_env(ResourcesConfig()) == {"DS_ACCELERATOR": "cpu"}


@pytest.mark.parametrize("num_gpus", [1.0, 0.5])
def test_a_worker_with_a_gpu_share_runs_on_the_gpu_ray_assigned(fake_cuda, num_gpus):
    """Ray shows an actor only the GPU it assigned, as device 0; a fractional share counts."""
    res = ResourcesConfig(num_gpus=num_gpus)
    assert worker_device(res, "trainer.resources") == torch.device("cuda", 0)
    assert deepspeed_env(res) == {"DS_ACCELERATOR": "cuda"}


def test_gpus_without_cuda_name_the_recipe_key(no_cuda):
    with pytest.raises(RuntimeError, match=r"teachers\.math\.resources\.num_gpus=1 .*no CUDA device.*"
                       r"set teachers\.math\.resources\.num_gpus=0"):  # fmt: skip
        worker_device(ResourcesConfig(num_gpus=1), "teachers.math.resources")


def _cfg() -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(config=tiny_mimo_config(), tokenizer="builtin:char")
    return cfg


def test_each_worker_asks_for_its_own_recipe_key(no_cuda):
    """The HF rollout, the HF teacher and a trainer rank each refuse a GPU they cannot see, naming
    their own key, before loading anything."""
    from rollout.hf import HFRolloutActor
    from teachers.hf import HFTeacherWorker
    from trainers.deepspeed_trainer import TrainerWorker

    cfg = _cfg()
    cfg.rollout.resources.num_gpus = 1
    with pytest.raises(RuntimeError, match=r"rollout\.resources\.num_gpus=1"):
        HFRolloutActor(cfg)
    teacher = TeacherConfig(config=tiny_mimo_config(), tokenizer="builtin:char")
    teacher.resources.num_gpus = 1
    with pytest.raises(RuntimeError, match=r"teachers\.code\.resources\.num_gpus=1"):
        HFTeacherWorker("code", teacher, seed=0, set_threads=False)
    cfg = _cfg()
    cfg.trainer.resources.num_gpus = 1
    with pytest.raises(RuntimeError, match=r"trainer\.resources\.num_gpus=1"):
        TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=29500)


def test_cpu_workers_keep_the_recipe_dtype_and_return_cpu_tensors():
    """Without GPUs nothing changes: the model in the recipe's dtype on the CPU, scores on the CPU."""
    from rollout.hf import HFRolloutActor
    from teachers.hf import HFTeacherWorker

    cfg = _cfg()
    cfg.student.dtype = "bfloat16"
    actor = HFRolloutActor(cfg)
    p = next(actor.model.parameters())
    assert (p.device.type, p.dtype, actor.device.type) == ("cpu", torch.bfloat16, "cpu")
    teacher = HFTeacherWorker("math", TeacherConfig(config=tiny_mimo_config(), tokenizer="builtin:char"), seed=0,
                              set_threads=False)  # fmt: skip
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    resp = torch.zeros(2, 6, dtype=torch.bool)
    resp[:, 3:] = True
    scores = teacher.score(ids, mask, resp, topk=4)
    assert {t.device.type for t in (scores.logprobs, scores.topk_ids, scores.topk_logprobs)} == {"cpu"}
    assert actor.logprobs(ids, mask).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hf_workers_on_a_gpu_give_the_cpu_results_on_the_cpu():
    """With ``num_gpus: 1`` the HF rollout and teacher compute on the GPU and hand back CPU tensors
    equal (float32, up to kernel rounding) to the CPU workers'; CPU weights load onto the GPU model.
    Runs only where CUDA is visible (not on the project's CPU machines)."""
    from mopd.types import PromptRow
    from rollout.hf import HFRolloutActor
    from teachers.hf import HFTeacherWorker

    cfg = _cfg()
    on_cpu = HFRolloutActor(cfg)
    cfg.rollout.resources.num_gpus = 1
    on_gpu = HFRolloutActor(cfg)
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    rows = [PromptRow(prompt=f"{i} + {i} = ", domain="math") for i in range(4)]
    batch = on_gpu.generate(rows, n=1, seed=0, greedy=True)
    assert {batch.input_ids.device.type, batch.rollout_logprobs.device.type} == {"cpu"}
    ids, mask, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    # Greedy log-probs are temperature-1 log-probs: the CPU model's, token for token.
    want = on_cpu.logprobs(ids, mask) * resp
    torch.testing.assert_close(batch.rollout_logprobs * resp, want, atol=1e-4, rtol=0)
    # A CPU state dict (the trainer's) loads onto the GPU model.
    shifted = {k: v + 0.01 if v.is_floating_point() else v for k, v in on_cpu.model.state_dict().items()}
    on_cpu.load_weights(shifted, version=1)
    on_gpu.load_weights(shifted, version=1)
    torch.testing.assert_close(on_gpu.logprobs(ids, mask), on_cpu.logprobs(ids, mask), atol=1e-4, rtol=0)

    spec = TeacherConfig(config=tiny_mimo_config(), tokenizer="builtin:char")
    cpu_teacher = HFTeacherWorker("math", spec, seed=1, set_threads=False)
    spec.resources.num_gpus = 1
    gpu_teacher = HFTeacherWorker("math", spec, seed=1, set_threads=False)
    a, b = (t.score(ids, mask, resp, topk=4) for t in (cpu_teacher, gpu_teacher))
    assert {b.logprobs.device.type, b.topk_logprobs.device.type, b.topk_ids.device.type} == {"cpu"}
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.topk_logprobs, a.topk_logprobs, atol=1e-4, rtol=0)
