"""Tests of the DeepSpeed trainer: in-process ranks (world size 1) and a 2-rank Ray pool.

    OMP_NUM_THREADS=1 pytest tests/test_trainer.py            # everything (~1-2 min on 2 cores)
    OMP_NUM_THREADS=1 pytest tests/test_trainer.py -m "not slow"

Tiny MiMo-V2-Flash students from config, the builtin char tokenizer, CPU only.
"""

from __future__ import annotations

import math
import pickle
import threading

import pytest
import torch

from mopd.config import ModelConfig, MOPDConfig
from mopd.dist.runtime import free_port
from mopd.models import forward_logits, load_model, sequence_logprobs, tiny_mimo_config, topk_logprobs
from mopd.objective import grpo_advantages
from mopd.types import PromptRow, RolloutBatch, TrainBatch
from trainers.deepspeed_trainer import TrainerWorker, lr_lambda, plan_micro_batches
from trainers.moe_balance import sigmoid_balance_loss
from trainers.shards import shard_batch

PROMPT_LEN, RESPONSE_LEN = 6, 8
DOMAINS = ("math", "code")


# --------------------------------------------------------------------------- helpers


def make_cfg(
    zero_stage: int = 0, micro_batch_size: int = 2, kind: str = "sampled", aux: float = 0.001, seed: int = 0
) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.run.total_steps = 10
    cfg.run.seed = seed
    cfg.student = ModelConfig(config=tiny_mimo_config(), tokenizer="builtin:char")
    cfg.trainer.zero_stage = zero_stage
    cfg.trainer.lr = 1e-3
    cfg.trainer.micro_batch_size = micro_batch_size
    cfg.trainer.aux_loss_coef = aux
    cfg.objective.kind = kind
    cfg.objective.topk = 16
    return cfg


def make_batch(cfg: MOPDConfig, rows: int = 6, teacher_seed: int = 1, data_seed: int = 0) -> TrainBatch:
    """Random prompts/responses of varied lengths (left-padded prompts, right-padded responses),
    rollout log-probs from the student's initial weights, teacher scores from a model built with
    ``teacher_seed`` (== cfg.run.seed: the teacher is the student itself)."""
    g = torch.Generator().manual_seed(data_seed)
    T = PROMPT_LEN + RESPONSE_LEN
    ids = torch.zeros(rows, T, dtype=torch.long)
    attn = torch.zeros(rows, T, dtype=torch.bool)
    resp = torch.zeros(rows, T, dtype=torch.bool)
    for b in range(rows):
        p, r = 2 + b % (PROMPT_LEN - 1), 1 + (3 * b) % RESPONSE_LEN
        ids[b, PROMPT_LEN - p] = 1  # BOS
        ids[b, PROMPT_LEN - p + 1 : PROMPT_LEN + r] = torch.randint(3, 100, (p - 1 + r,), generator=g)
        attn[b, PROMPT_LEN - p : PROMPT_LEN + r] = True
        resp[b, PROMPT_LEN : PROMPT_LEN + r] = True
    student = load_model(cfg.student, seed=cfg.run.seed)
    teacher = load_model(cfg.student, seed=teacher_seed)
    rollout_lp = sequence_logprobs(student, ids, attn) * resp
    teacher_lp = sequence_logprobs(teacher, ids, attn) * resp
    with torch.no_grad():
        top_ids, top_lp = topk_logprobs(forward_logits(teacher, ids, attn).logits, cfg.objective.topk)
    domains = [DOMAINS[b % 2] for b in range(rows)]
    group_ids = torch.arange(rows) // 2
    adv_orm = grpo_advantages(torch.randint(0, 2, (rows,), generator=g).float(), group_ids)
    rollout = RolloutBatch(
        input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logprobs=rollout_lp,
        group_ids=group_ids, domains=domains, rows=[PromptRow("p", d) for d in domains],
        responses=[""] * rows, policy_version=0, prompt_len=PROMPT_LEN,
    )  # fmt: skip
    return TrainBatch(rollout, teacher_lp, adv_orm, top_ids, top_lp)


def worker(cfg: MOPDConfig) -> TrainerWorker:
    return TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1"))


def max_change(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def capture_gradients(w: TrainerWorker) -> dict:
    """Make ``w`` record its accumulated gradients (pre-clip) just before each optimizer step:
    the dict it returns is refilled on every step (ZeRO 0: the gradients live on the module)."""
    grads: dict = {}
    real_step = w.engine.step

    def step(*args, **kwargs):
        grads.clear()
        grads.update({n: p.grad.detach().clone() for n, p in w.engine.module.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    w.engine.step = step
    return grads


def vector_norm(tensors) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


def hf_keys(cfg: MOPDConfig) -> set:
    return set(load_model(cfg.student).state_dict().keys())


# --------------------------------------------------------------------------- pure helpers


def test_micro_batch_plan_gives_every_rank_the_same_number_of_passes():
    cfg = make_cfg()
    batch = make_batch(cfg, rows=5)
    s0, s1 = shard_batch(batch, world_size=2, micro_batch_size=2)
    # Shard rows are local: rank 0 holds rows 0, 2, 4 of the batch, rank 1 rows 1, 3.
    assert [(m.rows, m.dummy) for m in plan_micro_batches(s0, 2)] == [([0, 1], False), ([2], False)]
    assert [(m.rows, m.dummy) for m in plan_micro_batches(s1, 2)] == [([0, 1], False), ([0], True)]
    # Fewer rows than ranks: the rank without rows still enters one (zero-weight) pass.
    _, lone = shard_batch(make_batch(cfg, rows=1), world_size=2, micro_batch_size=4)
    assert len(lone) == 0 and [(m.rows, m.dummy) for m in plan_micro_batches(lone, 4)] == [([0], True)]
    with pytest.raises(ValueError, match="more than the 2 it was cut for"):
        plan_micro_batches(s0, 1)


def test_token_budget_plans_give_every_rank_the_same_number_of_passes():
    """With trainer.max_tokens_per_micro_batch, ranks get rows dealt by length and micro-batches
    grouped under the budget (the micro-batch size is unused); the rank with fewer groups pads
    with zero-weight passes."""
    cfg = make_cfg()
    batch = make_batch(cfg, rows=7)
    lengths = batch.rollout.attention_mask.sum(-1).tolist()
    shards = shard_batch(batch, world_size=2, micro_batch_size=1, max_tokens=30)
    by_length = sorted(range(7), key=lambda i: (-lengths[i], i))
    assert [s.rows.tolist() for s in shards] == [sorted(by_length[0::2]), sorted(by_length[1::2])]
    plans = [plan_micro_batches(s, 1) for s in shards]
    assert len(plans[0]) == len(plans[1]) == shards[0].micro_batches == max(len(s.plan) for s in shards)
    for s, plan in zip(shards, plans, strict=True):
        real = [m.rows for m in plan if not m.dummy]
        assert sorted(i for rows in real for i in rows) == list(range(len(s)))
        for rows in real:
            span = s.attention_mask[rows].any(0).nonzero()
            assert len(rows) * (int(span[-1]) - int(span[0]) + 1) <= 30 or len(rows) == 1


def test_lr_schedules_warm_up_then_decay_to_zero():
    assert [lr_lambda("constant", 2, 10)(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    linear = lr_lambda("linear", 2, 10)
    assert linear(2) == 1.0 and linear(6) == pytest.approx(0.5) and linear(10) == 0.0
    cosine = lr_lambda("cosine", 0, 10)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)


def test_sigmoid_balance_loss_is_one_when_uniform_and_ignores_padding():
    # 4 tokens, 4 experts, top-2: every expert chosen twice, equal affinities -> 1.0.
    logits = torch.zeros(4, 4)
    idx = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert float(sigmoid_balance_loss([(logits, idx)], mask)) == pytest.approx(1.0)
    # Two extra padding tokens, routed and scored very unevenly, change nothing.
    pad_logits = torch.cat([logits, torch.tensor([[3.0, 3.0, -3.0, -3.0]] * 2)])
    pad_idx = torch.cat([idx, torch.tensor([[0, 1], [0, 1]])])
    pad_mask = torch.tensor([[True] * 4 + [False] * 2])
    assert float(sigmoid_balance_loss([(pad_logits, pad_idx)], pad_mask)) == pytest.approx(1.0)
    # Every token prefers and gets experts 0 and 1: the loss rises above 1 and its gradient
    # pushes the overloaded experts' logits down.
    skewed = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4, requires_grad=True)
    loss = sigmoid_balance_loss([(skewed, torch.tensor([[0, 1]] * 4))], mask)
    loss.backward()
    assert float(loss.detach()) > 1.0
    assert (skewed.grad[:, :2] > 0).all() and (skewed.grad[:, 2:] < 0).all()


# --------------------------------------------------------------------------- one rank, in-process


def test_two_steps_update_weights_and_report_per_domain_metrics():
    cfg = make_cfg()
    cfg.objective.alpha = 0.5  # outcome advantages in play too
    w = worker(cfg)
    batch = make_batch(cfg)
    before = w.state_dict()
    assert set(before) == hf_keys(cfg)
    m1, m2 = w.train_step(batch), w.train_step(batch)
    for m in (m1, m2):
        assert m["train/skipped"] == 0.0
        assert math.isfinite(m["train/loss"]) and math.isfinite(m["train/grad_norm"])
        assert m["train/aux_loss"] > 0  # MoE student: balance loss present
        for d in DOMAINS:
            assert {f"teacher/{d}/{k}" for k in ("reverse_kl", "is_masked_frac", "tokens")} <= m.keys()
        tokens = sum(m[f"teacher/{d}/tokens"] for d in DOMAINS)
        assert tokens == m["train/tokens"] == int(batch.rollout.response_mask.sum())
    assert m1["train/train_rollout_abs_diff"] < 1e-5  # rollout log-probs came from these weights
    assert m1["train/reverse_kl"] > 0.0
    assert m1["train/adv_mean"] != pytest.approx(-m1["train/reverse_kl"])  # the ORM term moved it
    assert max_change(before, w.state_dict()) > 1e-4
    assert w.get_version() == 2


def test_teacher_equal_to_student_gives_zero_kl_and_no_update():
    """Teacher == student: advantage, reverse KL, loss and gradient vanish. Mathematically they are 0;
    in float32 the trainer's and the scorer's forwards (different batch shapes) give log-probs that
    differ by a few ulps (|logp| <~ 10, ulp ~1e-6), so each is checked against that scale."""
    cfg = make_cfg(aux=0.0)  # isolate the distillation gradient
    w = worker(cfg)
    m = w.train_step(make_batch(cfg, teacher_seed=cfg.run.seed))
    # A = logp_teacher - logp_train is rounding only: a few ulps (<= ~1e-6) per token.
    assert abs(m["train/reverse_kl"]) < 1e-5 and abs(m["train/adv_mean"]) < 1e-5
    # loss = -mean(w * A * logp_train): |A| <~ 1e-6 times |logp| <~ 10.
    assert abs(m["train/loss"]) < 1e-4
    # The same step with another teacher: a real advantage and a real gradient.
    other = worker(cfg)
    m_other = other.train_step(make_batch(cfg, teacher_seed=cfg.run.seed + 1))
    assert m_other["train/reverse_kl"] > 1e-2 and m_other["train/grad_norm"] > 0.1
    # The gradient is linear in A: rounding-level A (<= ~1e-6, vs |A| ~ 1e-1 for the other teacher)
    # gives a gradient >= 1e4 times smaller than the other teacher's.
    assert m["train/grad_norm"] < 1e-4 * m_other["train/grad_norm"]
    # No check on the weights: AdamW's first step is ~lr * g / (|g| + eps) with eps 1e-8, a near
    # lr-sized step for rounding-noise g (seen: grad norm < 1e-6 moved weights by 8e-4), so only the
    # gradient can show "no update"; the trainer offers no optimizer whose step scales with g (SGD).


@pytest.mark.parametrize("micro", ["rows=1", "tokens=24", "tokens=1", "packed=20", "packed=1000"])
def test_micro_batches_do_not_change_the_update(micro):
    """Gradient accumulation must reproduce the whole-batch objective (mean over sequences): the
    same loss and the same accumulated gradient, up to float32 summation order, whether the
    micro-batches are single rows, rows grouped by length under a token budget (24 positions:
    groups of 1-3 rows here), one row each under a budget below every row's length, or rows
    packed end to end without padding (20 real tokens: groups of 2-3 rows; 1000: all in one)."""
    kind, n = micro.split("=")
    results = []
    for mbs, budget in ((1, 0) if kind == "rows" else (5, int(n)), (5, 0)):
        cfg = make_cfg(micro_batch_size=mbs, aux=0.0)
        cfg.trainer.max_tokens_per_micro_batch = budget
        cfg.trainer.pack_sequences = kind == "packed" and budget > 0
        w = worker(cfg)
        grads = capture_gradients(w)
        results.append((w.train_step(make_batch(cfg, rows=5)), grads))
    (m_a, g_a), (m_b, g_b) = results
    # Each pass trimmed to its rows' columns: one row or rows of like length pad less than all 5.
    assert 0 <= m_a["train/padding_frac"] < m_b["train/padding_frac"]
    assert g_a.keys() == g_b.keys() and g_a
    # Loss ~0.3, a mean of float32 per-token terms summed in another order: ~1e-7 apart (a few ulps).
    assert m_a["train/loss"] == pytest.approx(m_b["train/loss"], abs=1e-5)
    # Float32 gradients summed per micro-batch vs at once: relative error ~1e-6, allowed 1e-4.
    assert m_a["train/grad_norm"] == pytest.approx(m_b["train/grad_norm"], rel=1e-4)
    diff = vector_norm(g_a[k] - g_b[k] for k in g_a)
    assert diff <= 1e-4 * vector_norm(g_a.values()), (diff, vector_norm(g_a.values()))
    # The weights after the step are not compared: Adam's first step ~lr * g / (|g| + eps) turns
    # rounding-level gradient differences on near-zero entries into lr-sized weight differences;
    # the update is a function of the gradient, which is compared above.


def test_topk_objective_trains():
    cfg = make_cfg(kind="topk")
    w = worker(cfg)
    batch = make_batch(cfg)
    before = w.state_dict()
    m = w.train_step(batch)
    assert m["train/skipped"] == 0.0 and m["train/reverse_kl"] > 0 and math.isfinite(m["train/loss"])
    assert max_change(before, w.state_dict()) > 1e-4


def test_logprobs_equal_sequence_logprobs_of_the_same_weights():
    cfg = make_cfg()
    w = worker(cfg)
    batch = make_batch(cfg)
    w.train_step(batch)
    model = load_model(cfg.student)
    model.load_state_dict(w.state_dict())
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    torch.testing.assert_close(w.logprobs(ids, attn), sequence_logprobs(model.eval(), ids, attn), atol=1e-5, rtol=0)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_nonfinite_loss_skips_the_update(zero_stage):
    """Regression guard: a NaN teacher log-prob must not reach the weights or optimizer state."""
    cfg = make_cfg(zero_stage=zero_stage)
    w = worker(cfg)
    batch = make_batch(cfg)
    bad = TrainBatch(
        batch.rollout,
        batch.teacher_logprobs.clone(),
        batch.adv_orm,
        batch.teacher_topk_ids,
        batch.teacher_topk_logprobs,
    )
    row = 3
    bad.teacher_logprobs[row, batch.rollout.response_mask[row].nonzero()[0]] = float("nan")
    before = w.state_dict()
    m = w.train_step(bad)
    assert m["train/skipped"] == 1.0 and w.get_version() == 0
    assert max_change(before, w.state_dict()) == 0.0
    m = w.train_step(batch)  # training carries on normally
    assert m["train/skipped"] == 0.0 and math.isfinite(m["train/loss"]) and w.get_version() == 1
    assert max_change(before, w.state_dict()) > 1e-4


def test_zero3_state_dict_and_logprobs():
    cfg = make_cfg(zero_stage=3)
    w = worker(cfg)
    batch = make_batch(cfg)
    w.train_step(batch)
    sd = w.state_dict()
    assert set(sd) == hf_keys(cfg) and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    model = load_model(cfg.student)
    model.load_state_dict(sd)
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    torch.testing.assert_close(w.logprobs(ids, attn), sequence_logprobs(model.eval(), ids, attn), atol=1e-5, rtol=0)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    cfg = make_cfg(zero_stage=2)
    batch = make_batch(cfg)
    first = worker(cfg)
    first.train_step(batch)
    first.save_checkpoint(str(tmp_path / "ckpt"), {"step": 1})
    saved = first.state_dict()
    expected = first.train_step(batch)

    # A different seed: the fresh worker starts from other weights, so equality proves the load.
    fresh = worker(make_cfg(zero_stage=2, seed=7))
    assert max_change(saved, fresh.state_dict()) > 1e-3
    assert fresh.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 1}
    assert fresh.get_version() == 1
    assert max_change(saved, fresh.state_dict()) == 0.0
    got = fresh.train_step(batch)  # same optimizer moments and LR schedule -> same step
    assert got["train/loss"] == pytest.approx(expected["train/loss"], abs=1e-7)
    assert got["train/grad_norm"] == pytest.approx(expected["train/grad_norm"], rel=1e-6)
    assert max_change(first.state_dict(), fresh.state_dict()) < 1e-7


class _RunsCode:
    """A pickle payload: unpickling it calls ``os.system`` (what a tampered checkpoint would do)."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_checkpoint_files_load_weights_only(tmp_path, monkeypatch):
    """DeepSpeed itself unpickles checkpoint files with ``weights_only=False``; the worker's loader
    accepts its real files (the round trip above) and refuses an object that would run code."""
    from trainers.deepspeed_trainer import safe_checkpoint_load

    monkeypatch.chdir(tmp_path)
    torch.save({"module": {"w": torch.ones(2)}, "extra": _RunsCode()}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        safe_checkpoint_load(str(tmp_path / "mp_rank_00_model_states.pt"))
    assert not (tmp_path / "pwned").exists()
    cfg = make_cfg(zero_stage=2)
    w = worker(cfg)
    w.train_step(make_batch(cfg))
    w.save_checkpoint(str(tmp_path / "ckpt"), {"step": 1})
    optim = next((tmp_path / "ckpt").rglob("*optim_states.pt"))
    state = safe_checkpoint_load(str(optim), map_location="cpu")
    assert "optimizer_state_dict" in state
    # Every file a resume reads goes through a weights-only load.
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    assert worker(cfg).load_checkpoint(str(tmp_path / "ckpt")) == {"step": 1}
    assert calls and all(c is True for c in calls), calls


def test_save_hf_loads_with_from_pretrained_and_gives_the_same_logprobs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_cfg()
    w = worker(cfg)
    batch = make_batch(cfg)
    w.train_step(batch)
    w.save_hf(str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    torch.testing.assert_close(sequence_logprobs(model.eval(), ids, attn), w.logprobs(ids, attn), atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.decode(tok("a b\n1+2=3")["input_ids"], skip_special_tokens=True) == "a b\n1+2=3"


# --------------------------------------------------------------------------- Ray pool, two ranks


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_pool_two_ranks_zero2_matches_one_rank(ray_local, tmp_path):
    """Two ranks (ZeRO-2, 5 rows: rank 1 gets a zero-weight padding pass), each sent only its own
    rows with the whole batch's counts (trainers/shards.py), take the same step as one rank on the
    whole batch: the loss and the gradient norm are those of the whole batch; so does SFT."""
    from transformers import AutoModelForCausalLM

    from trainers import TrainerPool

    cfg = make_cfg(zero_stage=2)
    cfg.trainer.world_size = 2
    batch = make_batch(cfg, rows=5)
    ids, attn = batch.rollout.input_ids, batch.rollout.attention_mask
    pool = TrainerPool(cfg)
    try:
        before = pool.state_dict()
        assert set(before) == hf_keys(cfg)
        m1 = pool.train_step(batch)
        stepped = pool.state_dict()
        sft, m2 = pool.sft_step(batch), pool.train_step(batch)
        after = pool.state_dict()
        assert pool.get_version() == 3
        pool_logprobs = pool.logprobs(ids, attn)
        pool.save_checkpoint(str(tmp_path / "ckpt"), {"step": 2})
        assert pool.load_checkpoint(str(tmp_path / "ckpt")) == {"step": 2}
        pool.save_hf(str(tmp_path / "hf"))
    finally:
        pool.shutdown()
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    torch.testing.assert_close(sequence_logprobs(exported, ids, attn), pool_logprobs, atol=1e-5, rtol=0)
    assert all(math.isfinite(m["train/loss"]) and m["train/skipped"] == 0.0 for m in (m1, m2))
    assert max_change(before, after) > 1e-4

    single_cfg = make_cfg(zero_stage=2)
    single = worker(single_cfg)
    s1 = single.train_step(batch)
    # SFT at the weights the pool had (one step's weights differ by float noise that Adam can
    # amplify): the forward reads the module, so loading them there is enough for the loss.
    single.engine.module.load_state_dict(stepped)
    single_sft = single.sft_step(batch)
    # Other micro-batch shapes and a gloo all-reduce: float32 log-probs (|logp| <~ 10) agree to a
    # few ulps (~1e-6) per token, so token means like the loss and the reverse KL agree to < 1e-5.
    assert m1["train/loss"] == pytest.approx(s1["train/loss"], abs=1e-5)
    assert m1["train/grad_norm"] == pytest.approx(s1["train/grad_norm"], rel=1e-4)
    assert m1["train/tokens"] == s1["train/tokens"]
    for d in DOMAINS:
        assert m1[f"teacher/{d}/reverse_kl"] == pytest.approx(s1[f"teacher/{d}/reverse_kl"], abs=1e-5)
        assert m1[f"teacher/{d}/tokens"] == s1[f"teacher/{d}/tokens"]
    # The same weights: the two ranks' SFT shares sum to the one-rank token mean (~4.8 nats) up to
    # float32 rounding.
    assert sft["sft/loss"] == pytest.approx(single_sft["sft/loss"], rel=1e-5)


class _RecordingRank:
    """Stands in for a trainer rank in an in-process group: keeps the arguments it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def train_step(self, *args):
        self.calls.append(args)
        return {"train/loss": 0.0}


def test_pool_sends_each_rank_only_its_own_shard_as_its_own_ref(ray_local):
    """Each rank is called with one object ref holding its shard (its rows only); no ref holds the
    whole batch, so no rank fetches another rank's rows."""
    from mopd.dist.actors import ActorGroup
    from trainers import TrainerPool

    cfg = make_cfg(micro_batch_size=2)
    batch = make_batch(cfg, rows=5)
    pool = TrainerPool.__new__(TrainerPool)  # the pool's calls without its placement group and ranks
    pool._world_size, pool._micro_batch_size, pool._lock = 2, 2, threading.Lock()
    pool._max_tokens, pool._packed, pool._sp_size = 0, False, 1
    pool._actors = ActorGroup("trainer", local=True)
    pool._actors.start(_RecordingRank, [(), ()])
    pool.train_step(batch)
    refs = [rank.calls[0] for rank in pool._actors.actors]
    assert all(len(args) == 1 and isinstance(args[0], ray_local.ObjectRef) for args in refs)
    assert refs[0][0] != refs[1][0]
    shards = [ray_local.get(args[0]) for args in refs]
    assert [s.rows.tolist() for s in shards] == [[0, 2, 4], [1, 3]]
    assert [s.batch_rows for s in shards] == [5, 5]


@pytest.mark.slow
def test_pool_names_the_resources_it_cannot_get(ray_local):
    from trainers import TrainerPool

    cfg = make_cfg()
    cfg.trainer.world_size = 3  # 3 x 1 CPU on a 2-CPU cluster
    with pytest.raises(RuntimeError, match=r"3 x \{'CPU': 1.0\}"):
        TrainerPool(cfg, placement_timeout_s=1.0)


def test_sft_step_lowers_the_response_nll():
    """SFT (used by the quickstart) trains on the response tokens only and lowers their NLL."""
    cfg = make_cfg()
    cfg.trainer.lr = 3e-3
    w = worker(cfg)
    batch = make_batch(cfg)
    losses = [w.sft_step(batch)["sft/loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert w.get_version() == 8


def test_one_rank_stage_0_skips_the_all_reduce_and_matches_zero_2():
    """One rank, ZeRO stage 0: the worker turns off DeepSpeed's gradient all-reduce (over one rank
    it only copies gradients into buckets and back) and the update is ZeRO-2's. Three steps of
    three micro-batches each (so accumulation across micro-batches is covered): fp32 Adam steps of
    the same gradients summed in another order agree to float rounding."""
    batch = make_batch(make_cfg(), rows=6, teacher_seed=1)
    fast, zero2 = worker(make_cfg(zero_stage=0)), worker(make_cfg(zero_stage=2))
    assert fast.engine.enable_backward_allreduce is False
    assert zero2.engine.enable_backward_allreduce is True
    start = {k: v.detach().clone() for k, v in fast.engine.module.state_dict().items()}
    assert max_change(start, zero2.engine.module.state_dict()) == 0.0  # same seed, same init
    for _ in range(3):
        mf, m2 = fast.train_step(batch), zero2.train_step(batch)
        assert mf["train/loss"] == pytest.approx(m2["train/loss"], abs=1e-5)
        assert mf["train/grad_norm"] == pytest.approx(m2["train/grad_norm"], rel=1e-4)
    after = fast.engine.module.state_dict()
    assert max_change(start, after) > 1e-3  # the steps moved the weights
    assert max_change(after, zero2.engine.module.state_dict()) < 1e-5
