"""Rollout Routing Replay (mopd/routing.py): record/replay on tiny MiMoV2Flash and Qwen3-MoE
students, routes recorded by the HF rollout (one turn, and across the turns of a multi-turn
domain), and replay through the trainer's train_step.

    OMP_NUM_THREADS=1 pytest tests/test_routing.py
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, ConfigError, EnvironmentConfig, ModelConfig, MOPDConfig, validate
from mopd.envs import ParsedCall
from mopd.envs import parsers as env_parsers
from mopd.envs.parsers import ParsedTurn, ToolCallParser
from mopd.models import forward_logits, load_model, tiny_mimo_config, token_logprobs
from mopd.routing import NOT_RECORDED, align_routes, moe_routers, record_routes, replay_routes
from mopd.types import TrainBatch

VOCAB = 128


def tiny_qwen3_moe_config(**overrides):
    cfg = dict(
        model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    cfg.update(overrides)
    return cfg


CONFIGS = {
    "mimo": lambda: tiny_mimo_config(n_routed_experts=8),
    "qwen3_moe": tiny_qwen3_moe_config,
}


def build(arch: str, seed: int = 0):
    return load_model(ModelConfig(config=CONFIGS[arch](), tokenizer=BUILTIN_TOKENIZER), seed=seed).eval()


def inputs(B: int = 4, T: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :5] = False  # left padding in one row
    ids[~mask] = 0
    return ids, mask


def recorded_forward(model, ids, mask, routes=None):
    """(logits, routes the routers returned) of one forward, replaying ``routes`` if given."""
    with replay_routes(model, routes), record_routes(model) as rec:
        logits = forward_logits(model, ids, mask).logits
    return logits, rec.routes(rows=ids.shape[0])


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy whose router weights are noised, so it routes many tokens differently."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in moe_routers(other):
            r.weight.add_(torch.randn(r.weight.shape, generator=g) * scale * r.weight.std())
    return other


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_replaying_own_routes_reproduces_logits_and_experts(arch):
    model = build(arch)
    ids, mask = inputs()
    with torch.no_grad():
        logits, routes = recorded_forward(model, ids, mask)
        replayed, routes_again = recorded_forward(model, ids, mask, routes)
    L = len(moe_routers(model))
    assert routes.shape == (4, 24, L, 2) and routes.dtype == torch.int16
    assert torch.equal(routes_again, routes)
    assert torch.equal(replayed, logits)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_replay_forces_the_given_experts(arch):
    """Routes of a perturbed model are used exactly, although this model would choose others."""
    model = build(arch)
    other = perturbed(model, scale=1.0)
    ids, mask = inputs()
    with torch.no_grad():
        _, own = recorded_forward(model, ids, mask)
        _, foreign = recorded_forward(other, ids, mask)
        _, under_replay = recorded_forward(model, ids, mask, foreign)
    assert (own != foreign).any(dim=-1).float().mean() > 0.1, "perturbation too small to test anything"
    assert torch.equal(under_replay, foreign)


def test_unrecorded_positions_are_routed_afresh():
    model = build("mimo")
    ids, mask = inputs()
    with torch.no_grad():
        logits, routes = recorded_forward(model, ids, mask)
        partial = routes.clone()
        partial[:, -3:] = NOT_RECORDED
        replayed, got = recorded_forward(model, ids, mask, partial)
    assert torch.equal(got, routes) and torch.equal(replayed, logits)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_gradient_reaches_the_router_under_replay(arch):
    model = build(arch).train()
    other = perturbed(model, scale=1.0)
    ids, mask = inputs()
    with torch.no_grad():
        _, foreign = recorded_forward(other, ids, mask)
    with replay_routes(model, foreign):
        logits = forward_logits(model, ids, mask).logits
    token_logprobs(logits, ids)[mask].sum().backward()
    for r in moe_routers(model):
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_replay_rejects_routes_of_another_shape():
    model = build("qwen3_moe")
    ids, mask = inputs()
    with torch.no_grad():
        _, routes = recorded_forward(model, ids, mask)
        with pytest.raises(ValueError, match="one forward over the recorded"):
            recorded_forward(model, ids[:, :-1], mask[:, :-1], routes)
        with pytest.raises(ValueError, match="MoE layers"):
            recorded_forward(model, ids, mask, routes[:, :, :1])


def test_align_routes_cuts_and_marks_padding():
    routes = torch.arange(2 * 5 * 1 * 2, dtype=torch.int16).reshape(2, 5, 1, 2)
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    out = align_routes(routes, mask)
    assert out.shape == (2, 6, 1, 2)
    assert (out[0, 0] == NOT_RECORDED).all() and (out[:, 5] == NOT_RECORDED).all()
    assert torch.equal(out[1, :5], routes[1])


# --------------------------------------------------------------------------- rollout + agreement


def rollout_cfg(arch: str, dtype: str = "float32", replay: bool = True, max_new: int = 16) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(config=CONFIGS[arch](), tokenizer=BUILTIN_TOKENIZER, dtype=dtype)
    cfg.rollout.max_new_tokens = max_new
    cfg.rollout.routing_replay = replay
    return cfg


def rows(k: int):
    from mopd.types import PromptRow

    return [PromptRow(prompt=f"{i} + {i * 7} =" + " " * (i % 3), domain="math", index=i) for i in range(k)]


def choice_scores(model, ids, mask, routes):
    """(B, T, L, E) scores each router ranks experts by (its top-k), in one forward that replays
    ``routes``: MiMo-V2-Flash sigmoid + correction bias (one group), Qwen3-MoE softmax."""
    routers = moe_routers(model)
    scores = [None] * len(routers)

    def hook_for(layer: int):
        def hook(module, inputs, output):
            logits = output[0].float()
            if hasattr(module, "e_score_correction_bias"):
                assert module.num_group == 1  # no group-limited choice to reproduce
                scores[layer] = logits.sigmoid() + module.e_score_correction_bias
            else:
                scores[layer] = logits.softmax(-1)

        return hook

    with torch.no_grad(), replay_routes(model, routes):
        # Prepended after the replay hooks: these see the router's own output, before the replay.
        handles = [r.register_forward_hook(hook_for(i), prepend=True) for i, r in enumerate(routers)]
        try:
            forward_logits(model, ids, mask)
        finally:
            for h in handles:
                h.remove()
    B, T = ids.shape
    return torch.stack([s.reshape(B, T, -1) for s in scores], dim=2)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_hf_rollout_records_the_routes_a_full_forward_takes(arch):
    """In fp32, a teacher-forced forward over the sampled batch routes every real token (but each
    row's last, never fed back) to the experts the KV-cached sampling loop recorded, up to
    near-ties: the two forwards sum in other orders, so router scores within rounding of each
    other may rank either way. The forward replays the recorded routes, so that one such flip does
    not change the hidden states every later choice is made from."""
    from rollout.hf import HFRolloutActor

    actor = HFRolloutActor(rollout_cfg(arch))
    batch = actor.generate(rows(3), n=2, seed=0)
    assert batch.routed_experts is not None and batch.routed_experts.dtype == torch.int16
    rec = batch.routed_experts
    known = (rec >= 0).all(-1).all(-1)
    assert not known[~batch.attention_mask].any()
    assert known.sum() >= batch.attention_mask.sum() - len(batch)
    scores = choice_scores(actor.model, batch.input_ids, batch.attention_mask, rec)[known]  # (N, L, E)
    picked = scores.gather(-1, rec[known].long())  # (N, L, k)
    kth_best = scores.topk(rec.shape[-1], dim=-1).values[..., -1:]
    # Router scores in [0, 1 + bias] from fp32 hidden states: the two forwards' scores differ by
    # ~1e-6, so every recorded expert must score within 1e-4 of the full forward's k-th best.
    assert float((kth_best - picked).max()) <= 1e-4


def _agreement(arch: str):
    """Mean |logp_train - logp_rollout| over response tokens with and without replay, for a bf16
    rollout and an fp32 trainer on the same weights."""
    from rollout.hf import HFRolloutActor

    cfg = rollout_cfg(arch, dtype="bfloat16", max_new=24)
    actor = HFRolloutActor(cfg)
    batch = actor.generate(rows(4), n=4, seed=0)
    trainer = load_model(cfg.student, seed=cfg.run.seed, dtype="float32").eval()
    resp = batch.response_mask
    out = {}
    with torch.no_grad():
        for name, routes in (("off", None), ("on", batch.routed_experts)):
            with replay_routes(trainer, routes):
                logits = forward_logits(trainer, batch.input_ids, batch.attention_mask).logits
            lp = token_logprobs(logits, batch.input_ids)
            out[name] = float((lp - batch.rollout_logprobs).abs()[resp].mean())
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_replay_brings_trainer_logprobs_closer_to_the_rollout(arch):
    diff = _agreement(arch)
    assert diff["on"] < diff["off"], diff


# --------------------------------------------------------------------------- multi-turn


def test_a_trajectory_keeps_the_routes_of_the_turn_that_first_computed_each_position():
    """Trajectory.add_routes / pack_episodes without a model: turn 2 recomputes the prompt and turn
    1 with other experts, which are not kept; it fills the position turn 1 left unrouted (its last
    token) and the tool result; routes of tokens the trajectory dropped are not kept; the packed
    routes follow the batch's columns, -1 at padding."""
    from rollout.multiturn import Trajectory, pack_episodes

    def turn(n, value):  # (n, L=1, k=2) routes of one turn
        return torch.full((n, 1, 2), value, dtype=torch.int16)

    short = Trajectory(rows(1)[0], 0, "a", [], prompt=[1, 5])
    t = Trajectory(rows(1)[0], 1, "b", [], prompt=[1, 5, 6])
    t.append([7, 8], [-1.0, -1.0])
    first = turn(6, 1)
    first[4] = NOT_RECORDED  # the turn's last token, never fed back; first[5]: a dropped token
    t.add_routes(first)
    assert t.routes is not None and t.routes.shape == (5, 1, 2)
    t.append([9, 9], None)  # a tool result
    t.append([10], [-2.0])
    t.add_routes(turn(8, 2))
    assert t.routes[:, 0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    short.append([7], [-1.0])
    short.add_routes(turn(3, 3))
    b = pack_episodes([short, t], pad_id=0, policy_version=0)
    assert b.routed_experts is not None and b.routed_experts.shape == (2, 3 + 5, 1, 2)
    assert b.routed_experts[:, :, 0, 0].tolist() == [[-1, 3, 3, 3, -1, -1, -1, -1], [1, 1, 1, 1, 2, 2, 2, 2]]
    t.routes = None
    assert pack_episodes([short, t], pad_id=0, policy_version=0).routed_experts is None


class LooksUpEveryTurn(ToolCallParser):
    """Reads any turn as a ``lookup`` of its text: a random student then takes every turn allowed,
    each answered by a tool result (an error: nobody of that name) that the next turn prefills."""

    def parse(self, text, tools=()):
        return ParsedTurn("", [ParsedCall("lookup", {"name": text})])


def multi_turn_cfg(arch: str, dtype: str = "float32") -> MOPDConfig:
    cfg = rollout_cfg(arch, dtype=dtype, max_new=10)
    cfg.rollout.stop_token_ids = list(range(3, 99, 2))  # half the characters end a turn: several turns
    env = EnvironmentConfig(name="lookup", parser="lookup_every_turn_test", max_turns=3, max_tokens=60, workers=0)
    cfg.environments = {"agent": env}
    return cfg


def math_and_lookup_rows():
    from mopd.envs.builtin import lookup_rows

    return [*rows(2), *lookup_rows(random.Random(0), 2, "train", domain="agent")]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def multi_turn(request):
    """(actor, rows, batch): an fp32 HF rollout with routing replay of two one-turn rows and two
    rows of a ``lookup`` domain (environment in-process), two samples each."""
    from rollout.hf import HFRolloutActor

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(env_parsers._PARSERS, "lookup_every_turn_test", LooksUpEveryTurn)
        actor = HFRolloutActor(multi_turn_cfg(request.param))
        mixed = math_and_lookup_rows()
        try:
            batch = actor.generate(mixed, n=2, seed=0)
            yield actor, mixed, batch
        finally:
            actor.shutdown()


def test_multi_turn_routes_are_the_experts_every_position_went_to(multi_turn):
    """Every position's recorded experts are the ones a teacher-forced forward (replaying them)
    ranks top-k, up to near-ties (as for one turn above): prompt, each turn's sampled tokens and
    the tool results prefilled between turns; routes shifted by one column fail that check. The
    forward replaying them gives the rollout's log-probs at every sampled token."""
    actor, _, b = multi_turn
    agent = [i for i, r in enumerate(b.rows) if r.domain == "agent"]
    assert b.episodes is not None and all(b.episodes[i].turns >= 2 for i in agent)
    context = b.attention_mask & ~b.response_mask
    assert context[agent, b.prompt_len :].any()  # tool results inside the response region
    rec = b.routed_experts
    assert rec is not None and rec.shape[:2] == b.input_ids.shape and rec.dtype == torch.int16

    def worst_choice(routes):
        known = (routes >= 0).all(-1).all(-1)
        scores = choice_scores(actor.model, b.input_ids, b.attention_mask, routes)[known]
        picked = scores.gather(-1, routes[known].long())
        return float((scores.topk(routes.shape[-1], dim=-1).values[..., -1:] - picked).max())

    assert worst_choice(rec) <= 1e-4
    shifted = torch.where((rec >= 0) & (rec.roll(1, dims=1) >= 0), rec.roll(1, dims=1), rec)
    assert worst_choice(shifted) > 1e-3
    with torch.no_grad(), replay_routes(actor.model, rec):
        logits = forward_logits(actor.model, b.input_ids, b.attention_mask).logits
    replayed = token_logprobs(logits, b.input_ids)
    m = b.response_mask
    torch.testing.assert_close(replayed[m], b.rollout_logprobs[m], atol=1e-4, rtol=1e-4)


def test_multi_turn_routes_are_missing_only_at_padding(multi_turn):
    """-1 at every padding column, and inside a trajectory at most at its last token (a sampled
    token is routed when it is fed back, and nothing follows the last); a position is routed in
    every MoE layer and slot or in none."""
    _, _, b = multi_turn
    rec = b.routed_experts
    known = (rec >= 0).all(-1).all(-1)
    assert torch.equal(known, (rec >= 0).any(-1).any(-1))
    assert not known[~b.attention_mask].any()
    last = b.attention_mask.shape[1] - 1 - b.attention_mask.flip(1).long().argmax(1)  # each row's last real column
    unrouted = (b.attention_mask & ~known).nonzero().tolist()
    assert all(col == int(last[row]) for row, col in unrouted), unrouted


def test_a_one_turn_domain_is_rolled_out_as_before_beside_multi_turn_rows(multi_turn):
    """The one-turn rows of a mixed batch (the first part, seeded with seed_for(seed, 0)) have the
    ids and routes of a batch of those rows alone."""
    from mopd.seeds import seed_for

    actor, mixed, b = multi_turn
    one = [r for r in mixed if r.domain == "math"]
    alone = actor.generate(one, n=2, seed=seed_for(0, 0))
    assert alone.episodes is None and alone.routed_experts is not None
    for i in range(len(alone)):  # the math rows come first in both batches
        a, m = alone.attention_mask[i], b.attention_mask[i]
        assert b.rows[i].domain == "math" and torch.equal(alone.input_ids[i, a], b.input_ids[i, m])
        assert torch.equal(alone.routed_experts[i, a], b.routed_experts[i, m])
        assert torch.equal(alone.response_mask[i, a], b.response_mask[i, m])


# --------------------------------------------------------------------------- config + trainer


def _valid_cfg(**student) -> MOPDConfig:
    from mopd.config import DataSourceConfig, TeacherConfig

    cfg = MOPDConfig()
    cfg.run.total_steps = 1
    cfg.student = ModelConfig(tokenizer=BUILTIN_TOKENIZER, **student)
    cfg.teachers = {"math": TeacherConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER)}
    cfg.data.sources = [DataSourceConfig(domain="math", generator="math")]
    cfg.rollout.routing_replay = True
    return cfg


def test_config_rejects_routing_replay_with_a_dense_student():
    cfg = _valid_cfg(config={"model_type": "llama", "vocab_size": VOCAB})
    with pytest.raises(ConfigError, match="rollout.routing_replay.*'llama'.*mimo_v2_flash, qwen3_moe"):
        validate(cfg)
    validate(_valid_cfg(config=tiny_qwen3_moe_config()))


def test_config_rejects_routing_replay_with_the_vllm_backend():
    cfg = _valid_cfg(config=tiny_mimo_config())
    cfg.rollout.backend = "vllm"
    with pytest.raises(ConfigError, match="rollout.routing_replay.*backend 'vllm'"):
        validate(cfg)


def test_train_step_replays_the_rollout_routes():
    """End to end in-process: the HF rollout records routes in bf16, the fp32 TrainerWorker replays
    them (train_step and logprobs); its train/rollout log-prob gap is smaller than without them."""
    from dataclasses import replace

    from rollout.hf import HFRolloutActor
    from test_trainer import worker
    from trainers.deepspeed_trainer import _take_rows
    from trainers.shards import shard_batch

    cfg = rollout_cfg("mimo", dtype="bfloat16", max_new=16)
    cfg.run.total_steps = 2
    cfg.trainer.zero_stage, cfg.trainer.micro_batch_size, cfg.trainer.lr = 0, 4, 1e-3
    batch = HFRolloutActor(cfg).generate(rows(4), n=2, seed=0)
    w = worker(cfg)
    gap, lps = {}, {}
    for name, routes in (("on", batch.routed_experts), ("off", None)):
        lps[name] = lp = w.logprobs(batch.input_ids, batch.attention_mask, routed_experts=routes)
        gap[name] = float((lp - batch.rollout_logprobs).abs()[batch.response_mask].mean())
    assert gap["on"] < gap["off"], gap
    # trainer.pack_sequences: the routes are packed with their tokens and replayed alike.
    w.cfg.trainer.pack_sequences = True
    packed = w.logprobs(batch.input_ids, batch.attention_mask, routed_experts=batch.routed_experts)
    w.cfg.trainer.pack_sequences = False
    rm = batch.response_mask
    torch.testing.assert_close(packed[rm], lps["on"][rm], atol=1e-5, rtol=0)
    # The micro-batch slicing keeps routes aligned with the columns it keeps.
    [shard] = shard_batch(TrainBatch(batch, batch.rollout_logprobs.clone()), world_size=1, micro_batch_size=4)
    sub = _take_rows(shard, [1, 3])
    assert sub.routes is not None and sub.routes.shape[:2] == sub.input_ids.shape
    metrics = {}
    for name, b in (("on", batch), ("off", replace(batch, routed_experts=None))):
        w = worker(cfg)
        teacher = b.rollout_logprobs - 0.1 * b.response_mask.float()  # any dense reward
        metrics[name] = w.train_step(TrainBatch(b, teacher))
    for name, m in metrics.items():
        assert m["train/skipped"] == 0.0 and math.isfinite(m["train/loss"]), (name, m)
    assert metrics["on"]["train/train_rollout_abs_diff"] < metrics["off"]["train/train_rollout_abs_diff"]
