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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"zero_stage": 3}, "student.lora is not supported with trainer.zero_stage=3 yet"),
        ({"r": -1}, "student.lora: r must be >= 0"),
    ],
)
def test_lora_settings_are_checked(change, message):
    cfg = lora_cfg(**{k: v for k, v in change.items() if k != "zero_stage"})
    cfg.trainer.zero_stage = change.get("zero_stage", 0)
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
