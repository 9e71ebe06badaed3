"""A LoRA student (``student.lora``): the trainer trains a PEFT adapter and nothing else; what leaves
it (the state dict, the weights sent to the rollout, ``save_hf``) is the merged model under the
student's own names; checkpoints hold the adapter and its optimizer state and resume exactly;
``mopd export --adapter`` writes the adapter alone.

    OMP_NUM_THREADS=1 pytest tests/test_lora_student.py     # ~30 s
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mopd.config import ConfigError, LoraSettings, StudentConfig, validate
from mopd.models import load_model, sequence_logprobs, tiny_mimo_config
from test_trainer import hf_keys, make_batch, make_cfg, max_change, worker
from trainers.deepspeed_trainer import safe_checkpoint_load
from trainers.lora import merged_state_dict

LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])


def lora_cfg(zero_stage: int = 0, seed: int = 0, tie: bool = False, **lora):
    cfg = make_cfg(zero_stage=zero_stage, seed=seed)
    model = tiny_mimo_config(tie_word_embeddings=tie)
    cfg.student = StudentConfig(config=model, tokenizer="builtin:char", lora=replace(LORA, **lora))
    return cfg


def optimizer_elements(w) -> int:
    """Elements of the optimizer's state (Adam's two moments), however DeepSpeed holds it."""
    opt = getattr(w.engine.optimizer, "optimizer", w.engine.optimizer)
    return sum(t.numel() for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)


def test_only_the_adapter_trains_and_the_rollout_gets_merged_weights():
    cfg = lora_cfg()
    batch = make_batch(cfg)
    w = worker(cfg)
    start = w.state_dict()
    assert set(start) == hf_keys(cfg)  # the student's own names: the rollout and exports never see PEFT
    base = load_model(cfg.student, seed=cfg.run.seed)
    assert max_change(start, base.state_dict()) == 0.0  # B = 0: the merged model starts as the student
    frozen = {n: p.detach().clone() for n, p in w.engine.module.named_parameters() if not p.requires_grad}
    for _ in range(2):
        metrics = w.train_step(batch)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert all(torch.equal(p, frozen[n]) for n, p in w.engine.module.named_parameters() if not p.requires_grad)
    after = w.state_dict()
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert moved and all(any(t in k for t in ("q_proj", "v_proj", "o_proj")) for k in moved), sorted(moved)[:5]
    # The merged weights are what the student computes: the trainer's log-probs equal a plain
    # model's loaded with them.
    plain = load_model(cfg.student, seed=1)
    plain.load_state_dict(after)
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    torch.testing.assert_close(w.logprobs(ids, attn), sequence_logprobs(plain.eval(), ids, attn), atol=1e-5, rtol=0)
    # What the weight sync sends: the same names and tensors.
    sent = dict(w._weights_one_by_one(w._live_state()))
    assert sent.keys() == after.keys() and max_change(sent, after) == 0.0


def test_the_optimizer_state_is_the_adapters():
    cfg = lora_cfg(zero_stage=2)
    w = worker(cfg)
    w.train_step(make_batch(cfg))
    adapter = sum(p.numel() for p in w.engine.module.parameters() if p.requires_grad)
    full = sum(p.numel() for p in w.engine.module.parameters())
    print(f"adapter {adapter} of {full} parameters; optimizer state {optimizer_elements(w)} elements")
    assert optimizer_elements(w) <= 3 * adapter and adapter < full / 10  # fp32 master + two moments at most


def test_a_full_student_has_no_adapter_to_send():
    w = worker(make_cfg())
    with pytest.raises(ValueError, match="the student has no LoRA adapter"):
        w.state_dict(adapter=True)


def test_merged_state_dict_equals_pefts_merge():
    from peft import LoraConfig, get_peft_model

    cfg = lora_cfg()
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_model(cfg.student, seed=0),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    )
    ours = merged_state_dict(peft_model)
    theirs = peft_model.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    assert max_change(ours, theirs) < 1e-6


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
def test_a_checkpoint_holds_the_adapter_and_resumes_exactly(tmp_path, tie):
    cfg = lora_cfg(zero_stage=2, tie=tie)
    batch = make_batch(cfg)
    first = worker(cfg)
    first.train_step(batch)
    first.save_checkpoint(str(tmp_path / "ckpt"), {"step": 1})
    saved = first.state_dict()
    expected = first.train_step(batch)
    (states,) = (tmp_path / "ckpt").rglob("*model_states.pt")
    saved_module = safe_checkpoint_load(str(states), map_location="cpu")["module"]
    trainable = {n for n, p in first.engine.module.named_parameters() if p.requires_grad}
    assert set(saved_module) == trainable  # the adapter, not the base (nor a tied copy of its embeddings)

    fresh = worker(lora_cfg(zero_stage=2, tie=tie))
    assert fresh.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 1}
    assert max_change(saved, fresh.state_dict()) == 0.0
    got = fresh.train_step(batch)  # same adapter, moments and schedule -> the same step
    assert got["train/loss"] == expected["train/loss"] and got["train/grad_norm"] == expected["train/grad_norm"]
    assert max_change(first.state_dict(), fresh.state_dict()) == 0.0


def test_save_hf_writes_the_merged_model_and_export_the_adapter_alone(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mopd.app.export import export_checkpoint

    cfg = lora_cfg()
    batch = make_batch(cfg)
    w = worker(cfg)
    w.train_step(batch)
    ckpt = tmp_path / "step_000001"
    w.save_hf(str(ckpt / "hf"))
    (ckpt / "state.json").write_text("{}")
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    merged = AutoModelForCausalLM.from_pretrained(export_checkpoint(ckpt, tmp_path / "merged")).eval()
    torch.testing.assert_close(sequence_logprobs(merged, ids, attn), w.logprobs(ids, attn), atol=1e-5, rtol=0)
    out = export_checkpoint(ckpt, tmp_path / "adapter", adapter=True)
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    with_adapter = PeftModel.from_pretrained(load_model(cfg.student, seed=cfg.run.seed), out).eval()
    torch.testing.assert_close(sequence_logprobs(with_adapter, ids, attn), w.logprobs(ids, attn), atol=1e-5, rtol=0)
    full = tmp_path / "full" / "step_000001"
    worker(make_cfg()).save_hf(str(full / "hf"))
    (full / "state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        export_checkpoint(full, tmp_path / "none", adapter=True)


def test_zero3_partitions_the_base_and_trains_the_adapter_as_zero0(tmp_path):
    """Under ZeRO-3 every weight (the frozen base too) is a partition: the merged weights, the
    weight sync, ``save_hf`` and its adapter are gathered one weight at a time, and they equal
    ZeRO-0's; a checkpoint holds the adapter and resumes exactly."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    cfg0, cfg3 = lora_cfg(zero_stage=0), lora_cfg(zero_stage=3)
    batch = make_batch(cfg0)
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    w0 = worker(cfg0)
    torch.manual_seed(1234)  # the adapter's init follows run.seed, not the process's random state
    w3 = worker(cfg3)
    assert all(p.numel() == 0 for p in w3.engine.module.parameters())  # partitioned: nothing whole at rest
    start = w3.state_dict()
    assert set(start) == hf_keys(cfg3) and max_change(start, w0.state_dict()) == 0.0
    for _ in range(2):
        m0, m3 = w0.train_step(batch), w3.train_step(batch)
    # Other reduction paths: float32 sums in another order, so close, not equal.
    assert m3["train/loss"] == pytest.approx(m0["train/loss"], abs=1e-6)
    assert m3["train/grad_norm"] == pytest.approx(m0["train/grad_norm"], rel=1e-5)
    after = w3.state_dict()
    assert max_change(after, w0.state_dict()) < 1e-6
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert moved and all(any(t in k for t in ("q_proj", "v_proj", "o_proj")) for k in moved), sorted(moved)[:5]
    # The adapter alone (LoRA hot-load on vLLM): PEFT's saved names, gathered like the rest.
    adapter = w3.state_dict(adapter=True)
    peft_saved = get_peft_model_state_dict(w0.engine.module)
    assert adapter.keys() == peft_saved.keys() and all(".lora_" in k for k in adapter)
    assert max_change(adapter, peft_saved) < 1e-6
    live = w3._live_state()
    sent = dict(w3._weights_one_by_one(live))
    assert max_change(sent, after) == 0.0
    assert {s.name: s.shape for s in w3._weight_specs(live)} == {k: tuple(v.shape) for k, v in after.items()}

    w3.save_hf(str(tmp_path / "hf"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    torch.testing.assert_close(sequence_logprobs(merged, ids, attn), w3.logprobs(ids, attn), atol=1e-5, rtol=0)
    adapter = PeftModel.from_pretrained(load_model(cfg3.student, seed=cfg3.run.seed), str(tmp_path / "hf" / "adapter"))
    torch.testing.assert_close(sequence_logprobs(adapter.eval(), ids, attn), w3.logprobs(ids, attn), atol=1e-5, rtol=0)

    w3.save_checkpoint(str(tmp_path / "ckpt"), {"step": 2})
    expected = w3.train_step(batch)
    fresh = worker(lora_cfg(zero_stage=3))
    assert fresh.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 2}
    assert max_change(after, fresh.state_dict()) == 0.0
    got = fresh.train_step(batch)
    assert got["train/loss"] == expected["train/loss"] and got["train/grad_norm"] == expected["train/grad_norm"]
    assert max_change(w3.state_dict(), fresh.state_dict()) == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sequence_parallel_size": 2}, "student.lora is not supported with trainer.sequence_parallel_size>1 yet"),
        ({"r": -1}, "student.lora: r must be >= 0"),
    ],
)
def test_lora_settings_are_checked(change, message):
    cfg = lora_cfg(**{k: v for k, v in change.items() if k != "sequence_parallel_size"})
    cfg.trainer.sequence_parallel_size = change.get("sequence_parallel_size", 1)
    cfg.data.sources = []
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_plan_prices_the_adapters_optimizer_state():
    from mopd.dist.plan import lora_params, plan_recipe

    cfg = lora_cfg(zero_stage=2)
    cfg.data.sources = []
    full = plan_recipe(replace(cfg, student=replace(cfg.student, lora=LoraSettings())), 80).actors[0]
    lora = plan_recipe(cfg, 80).actors[0]
    w = worker(cfg)
    assert lora_params(cfg.student) == sum(p.numel() for p in w.engine.module.parameters() if p.requires_grad)
    assert lora.parts["weights"] == full.parts["weights"] + 4 * lora_params(cfg.student)  # the base, plus the adapter
    assert lora.parts["optimizer"] < full.parts["optimizer"] / 10 and "LoRA r=4" in lora.note
    # ZeRO-3 over two ranks: each holds half the frozen base and half the adapter's fp32 copy.
    cfg.trainer.zero_stage, cfg.trainer.world_size = 3, 2
    full3 = plan_recipe(replace(cfg, student=replace(cfg.student, lora=LoraSettings())), 80).actors[0]
    lora3 = plan_recipe(cfg, 80).actors[0]
    assert lora3.parts["weights"] == pytest.approx(full3.parts["weights"] + 4 * lora_params(cfg.student) / 2)
