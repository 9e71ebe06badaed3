"""The MOPD objective: hand-computed values, the IS band, empty responses, and Eq. 6."""

import inspect
import math

import pytest
import torch

from mopd import objective
from mopd.config import ObjectiveConfig
from mopd.objective import grpo_advantages

# The coefficients the hand-computed values below use, passed explicitly: the objective functions
# have no defaults of their own (a recipe's come from mopd/config.py).
SAMPLED = dict(eps_low=0.5, eps_high=5.0, alpha=0.0, adv_clip=5.0)
TOPK = dict(eps_low=0.5, eps_high=5.0, forward_kl=0.0)


def mopd_loss(*args, **kwargs):
    return objective.mopd_loss(*args, **{**SAMPLED, **kwargs})


def topk_reverse_kl_loss(*args, **kwargs):
    return objective.topk_reverse_kl_loss(*args, **{**TOPK, **kwargs})


def test_coefficients_have_no_default_but_the_recipes():
    for fn, coefficients in ((objective.mopd_loss, SAMPLED), (objective.topk_reverse_kl_loss, TOPK)):
        params = inspect.signature(fn).parameters
        assert all(params[name].default is inspect.Parameter.empty for name in coefficients), fn.__name__
    assert {k: getattr(ObjectiveConfig(), k) for k in {**SAMPLED, **TOPK}} == {**SAMPLED, **TOPK}


def _t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_hand_computed_loss_with_masked_token():
    # Row 0: two response tokens (w = 1 each: train == rollout); row 1: one token, one padding.
    lt = _t([[-1.0, -2.0], [-0.5, -9.0]]).requires_grad_()
    lr = lt.detach().clone()
    lteach = _t([[-0.5, -3.0], [-0.25, 123.0]])  # the padded 123 must not matter
    mask = torch.tensor([[True, True], [True, False]])
    loss, m = mopd_loss(lt, lr, lteach, mask)
    # A = teacher - train: row 0: 0.5, -1.0; row 1: 0.25
    row0 = (0.5 * -1.0 + -1.0 * -2.0) / 2  # 0.75
    row1 = 0.25 * -0.5  # -0.125
    assert loss.item() == pytest.approx(-(row0 + row1) / 2)
    assert m["reverse_kl"] == pytest.approx((-0.5 + 1.0 - 0.25) / 3)
    assert m["is_masked_frac"] == 0.0
    assert m["adv_mean"] == pytest.approx((0.5 - 1.0 + 0.25) / 3)
    loss.backward()
    # d loss / d logp_train = -(w * A) / |y| / B, zero on padding
    assert torch.allclose(lt.grad, _t([[-0.5 / 4, 1.0 / 4], [-0.25 / 2, 0.0]]))


def test_is_band_edges_are_inclusive_and_outside_is_masked():
    lt = torch.zeros(1, 4, requires_grad=True)
    # ratios exp(lt - lr): exactly eps_low, exactly eps_high, just below eps_low, just above eps_high
    ratios = torch.tensor([0.5, 5.0, 0.49, 5.01])
    lr = (-ratios.log())[None]
    lteach = torch.ones(1, 4)  # A = 1 everywhere
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = mopd_loss(lt, lr, lteach, mask, eps_low=0.5, eps_high=5.0)
    assert m["is_masked_frac"] == pytest.approx(0.5)
    # sum w*A*logp / 4 with logp = 0 -> loss 0, gradient -w*A/4 per token
    loss.backward()
    assert torch.allclose(lt.grad, torch.tensor([[-0.5 / 4, -5.0 / 4, 0.0, 0.0]]), atol=1e-6)


def test_advantage_clip_and_orm_term():
    lt = torch.zeros(2, 1, requires_grad=True)
    lteach = _t([[-20.0], [0.0]])  # row 0 clipped to -5
    mask = torch.ones(2, 1, dtype=torch.bool)
    adv_orm = _t([1.0, -1.0])
    loss, m = mopd_loss(lt, lt.detach(), lteach, mask, adv_orm, alpha=0.5, adv_clip=5.0)
    loss.backward()
    # A = clip(...) + 0.5 * adv_orm: row 0: -5 + 0.5 = -4.5; row 1: 0 - 0.5
    assert torch.allclose(lt.grad, _t([[4.5 / 2], [0.5 / 2]]))
    assert m["adv_clipped_frac"] == pytest.approx(0.5)


def test_per_sequence_normalisation_not_token_mean():
    lt = torch.zeros(2, 3, requires_grad=True)
    lteach = torch.ones(2, 3)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    mopd_loss(lt, lt.detach(), lteach, mask)[0].backward()
    # row 0 has one token (weight 1/1), row 1 three (1/3 each), then / 2 sequences
    assert torch.allclose(lt.grad, _t([[-0.5, 0, 0], [-1 / 6, -1 / 6, -1 / 6]]))


def test_empty_response_contributes_nothing_and_no_nan():
    lt = torch.tensor([[-1.0, -2.0], [float("nan"), float("-inf")]], requires_grad=True)
    lr = torch.tensor([[-1.0, -2.0], [0.0, 0.0]])
    lteach = torch.tensor([[-0.5, -3.0], [float("nan"), 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    loss, m = mopd_loss(lt, lr, lteach, mask)
    alone, _ = mopd_loss(lt[:1].detach().requires_grad_(), lr[:1], lteach[:1], mask[:1])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(alone.item())
    loss.backward()
    assert torch.isfinite(lt.grad).all() and (lt.grad[1] == 0).all()
    assert all(math.isfinite(v) for v in m.values())


def test_all_empty_batch_is_zero_with_graph():
    lt = torch.zeros(2, 2, requires_grad=True)
    loss, m = mopd_loss(lt, lt.detach(), lt.detach(), torch.zeros(2, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and m["num_tokens"] == 0.0


def test_gradient_flows_only_through_logp_train():
    lt = torch.randn(2, 3, requires_grad=True)
    lr = torch.randn(2, 3, requires_grad=True)
    lteach = torch.randn(2, 3, requires_grad=True)
    adv = torch.randn(2, requires_grad=True)
    loss, _ = mopd_loss(lt, lr, lteach, torch.ones(2, 3, dtype=torch.bool), adv, alpha=1.0)
    loss.backward()
    assert lt.grad is not None
    assert lr.grad is None and lteach.grad is None and adv.grad is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq6_expected_surrogate_gradient_is_reverse_kl_gradient(seed):
    """With w = 1, alpha = 0 and no clipping, E_{y~pi_theta}[grad surrogate(y)] = grad KL(pi_theta||pi_d)."""
    g = torch.Generator().manual_seed(seed)
    V = 7
    theta = torch.randn(V, generator=g, dtype=torch.float64)
    logp_d = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64), 0)

    th = theta.clone().requires_grad_()
    logp = torch.log_softmax(th, 0)
    (logp.exp() * (logp - logp_d)).sum().backward()
    kl_grad = th.grad.clone()

    expected = torch.zeros(V, dtype=torch.float64)
    probs = torch.softmax(theta, 0)
    for y in range(V):  # exact expectation by enumeration over the sampled token
        th = theta.clone().requires_grad_()
        lp = torch.log_softmax(th, 0)[y].reshape(1, 1)
        loss, _ = mopd_loss(lp, lp.detach(), logp_d[y].reshape(1, 1), torch.ones(1, 1, dtype=torch.bool), adv_clip=1e9)
        loss.backward()
        expected += probs[y] * th.grad
    assert torch.allclose(expected, kl_grad, atol=1e-10)


def test_topk_with_full_vocab_is_exact_reverse_kl():
    g = torch.Generator().manual_seed(0)
    V = 5
    s_logits = torch.randn(1, 2, V, generator=g, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(1, 2, V, generator=g), -1)
    s_logp = torch.log_softmax(s_logits, -1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    zeros = torch.zeros(1, 2)
    loss, m = topk_reverse_kl_loss(s_logp, t_logp, zeros, zeros, mask)
    exact = (s_logp.exp() * (s_logp - t_logp)).sum(-1).mean()
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    assert m["topk_mass"] == pytest.approx(1.0, rel=1e-5)


def test_topk_forward_term_adds_the_forward_kl():
    g = torch.Generator().manual_seed(1)
    s_logp = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), -1)
    t_logp = torch.log_softmax(torch.randn(2, 3, 6, generator=g, dtype=torch.float64), -1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    reverse, _ = topk_reverse_kl_loss(s_logp, t_logp, zeros, zeros, mask)
    both, m = topk_reverse_kl_loss(s_logp, t_logp, zeros, zeros, mask, forward_kl=0.5)
    forward = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    assert both.item() == pytest.approx(reverse.item() + 0.5 * forward.item(), rel=1e-9)
    assert m["forward_kl"] == pytest.approx(forward.item(), rel=1e-9)


def _teacher_token_grad(student_logp_of_teacher_token: float, forward_kl: float) -> float:
    """d loss / d (student logit of the teacher's token), one position, teacher one-hot on token 0."""
    V = 8
    logits = torch.zeros(V, dtype=torch.float64)
    logits[1] = 12.0  # the student's confident (wrong) choice
    logits[0] = math.log(math.exp(12.0) * math.exp(student_logp_of_teacher_token))  # p_s(0) ~ as asked
    logits = logits.reshape(1, 1, V).requires_grad_()
    t_logp = torch.full((1, 1, V), -30.0, dtype=torch.float64)
    t_logp[..., 0] = 0.0
    one = torch.ones(1, 1, dtype=torch.bool)
    zeros = torch.zeros(1, 1, dtype=torch.float64)
    loss, _ = topk_reverse_kl_loss(torch.log_softmax(logits, -1), t_logp, zeros, zeros, one, forward_kl=forward_kl)
    loss.backward()
    return float(logits.grad[0, 0, 0])


def test_reverse_kl_cannot_move_a_confidently_wrong_student_and_the_forward_term_can():
    """The reason for objective.forward_kl: reverse KL's push towards the teacher's token scales
    with the student's probability of it; the forward KL's is ~1 whatever that probability."""
    reverse = _teacher_token_grad(-10.0, forward_kl=0.0)
    both = _teacher_token_grad(-10.0, forward_kl=1.0)
    assert -1e-2 < reverse < 0  # the right direction, ~p_s * (log p_s - KL) ~ 1e-3
    assert both < -0.9  # descending lowers the loss by raising the teacher's token
    assert abs(_teacher_token_grad(-1.0, forward_kl=0.0)) > 100 * abs(reverse)  # a likely token moves


def test_grpo_advantages():
    r = _t([1.0, 0.0, 1.0, 1.0, 0.5])
    gid = torch.tensor([0, 0, 1, 1, 2])
    a = grpo_advantages(r, gid)
    assert torch.allclose(a, _t([1.0, -1.0, 0.0, 0.0, 0.0]), atol=1e-5)
    r = _t([3.0, 1.0, 2.0])
    a = grpo_advantages(r, torch.tensor([7, 7, 7]))
    std = torch.tensor([1.0, -1.0, 0.0]).pow(2).mean().sqrt()
    assert torch.allclose(a, _t([1.0, -1.0, 0.0]) / std, atol=1e-5)


# --------------------------------------------------------------------------- objectives by kind


def _loss_inputs(seed: int, b: int = 3, t: int = 5, k: int = 4) -> objective.LossInputs:
    """Random (b, t) log-probs, a ragged mask (row 2 empty) and (b, t, K) top-k log-probs."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(b, t, 6, generator=g), -1)[..., 0]
    mask = torch.tensor([[True] * t, [True, True, False, False, False], [False] * t])
    return objective.LossInputs(
        logp_train=(lp + 0.1 * torch.randn(b, t, generator=g)).requires_grad_(),
        rollout=lp,
        teacher=torch.log_softmax(torch.randn(b, t, 6, generator=g), -1)[..., 0],
        response_mask=mask,
        adv_orm=torch.randn(b, generator=g),
        student_topk=torch.log_softmax(torch.randn(b, t, k, generator=g), -1).requires_grad_(),
        teacher_topk=torch.log_softmax(torch.randn(b, t, k, generator=g), -1),
    )


def _direct(kind: str, x: objective.LossInputs, o: ObjectiveConfig):
    if kind == "sampled":
        return objective.mopd_loss(
            x.logp_train, x.rollout, x.teacher, x.response_mask, x.adv_orm,
            eps_low=o.eps_low, eps_high=o.eps_high, alpha=o.alpha, adv_clip=o.adv_clip,
        )  # fmt: skip
    return objective.topk_reverse_kl_loss(
        x.student_topk, x.teacher_topk, x.logp_train, x.rollout, x.response_mask,
        eps_low=o.eps_low, eps_high=o.eps_high, forward_kl=o.forward_kl,
    )  # fmt: skip


def _grads(loss: torch.Tensor, x: objective.LossInputs) -> list[torch.Tensor | None]:
    leaves = [x.logp_train, x.student_topk]
    assert all(t is not None for t in leaves)
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [None if gr is None else gr.clone() for gr in got]


@pytest.mark.parametrize(
    ("kind", "settings"),
    [("sampled", {}), ("sampled", {"alpha": 0.5, "adv_clip": 0.3}), ("topk", {}), ("topk", {"forward_kl": 0.7})],
)
def test_each_builtin_objective_is_its_loss_function(kind, settings):
    """The registered objective gives bitwise the loss, gradients and metrics of calling the loss
    function itself with the recipe's coefficients."""
    o = ObjectiveConfig(kind=kind, **settings)
    x = _loss_inputs(seed=3)
    got_loss, got_m = objective.get_objective(kind).loss(x, o)
    want_loss, want_m = _direct(kind, x, o)
    assert torch.equal(got_loss, want_loss) and got_m == want_m
    for got, want in zip(_grads(got_loss, x), _grads(want_loss, x), strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


def test_what_each_builtin_objective_asks_for():
    sampled, topk = objective.get_objective("sampled"), objective.get_objective("topk")
    o = ObjectiveConfig(topk=16, alpha=0.5)
    assert (sampled.teacher_topk(o), topk.teacher_topk(o)) == (0, 16)
    assert sampled.uses_outcome_reward(o) and not sampled.uses_outcome_reward(ObjectiveConfig(alpha=0.0))
    assert not topk.uses_outcome_reward(o)
    assert (sampled.extra_logit_bytes(o), topk.extra_logit_bytes(o)) == (0, 8)
    assert sampled.check(ObjectiveConfig()) == [] and topk.check(ObjectiveConfig(kind="topk", forward_kl=1.0)) == []


def test_topk_objective_without_topk_inputs_says_what_is_missing():
    x = _loss_inputs(seed=0)
    x = objective.LossInputs(x.logp_train, x.rollout, x.teacher, x.response_mask)
    with pytest.raises(ValueError, match="objective.kind is 'topk' but the TrainBatch has no teacher_topk"):
        objective.get_objective("topk").loss(x, ObjectiveConfig(kind="topk"))


def test_the_registry_refuses_a_second_objective_of_one_kind(monkeypatch):
    monkeypatch.setattr(objective, "_OBJECTIVES", dict(objective._OBJECTIVES))

    class Other(objective.SampledObjective):
        pass

    with pytest.raises(ValueError, match=r"objective kind 'sampled' is already registered \(SampledObjective\)"):
        objective.register_objective(Other())
    assert type(objective.get_objective("sampled")) is objective.SampledObjective


def test_an_unknown_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"^objective.kind is 'full'; valid: sampled, topk$"):
        objective.get_objective("full")


class _Toy(objective.Objective):
    """Mean squared gap to the teacher's top-k log-probs: a loss no branch in the code knows of."""

    kind = "toy"

    def teacher_topk(self, o):
        return 2

    def loss(self, x, o):
        assert x.student_topk is not None and x.teacher_topk is not None
        gap = (x.student_topk - x.teacher_topk).pow(2).sum(-1)
        loss = objective._sequence_mean(gap, x.response_mask)
        n = float(x.response_mask.sum())
        return loss, {"num_tokens": n, "reverse_kl": 1.0, "is_masked_frac": 0.0}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(objective, "_OBJECTIVES", dict(objective._OBJECTIVES))
    return objective.register_objective(_Toy())


def test_a_registered_objective_is_what_the_trainer_runs(toy):
    """The trainer's per-domain code path looks the kind up: a new objective needs no branch there."""
    from trainers.deepspeed_trainer import _Rows, domain_loss, logprobs_at, student_topk_logprobs

    g = torch.Generator().manual_seed(0)
    b, t, v = 2, 4, 7
    logits = torch.randn(b, t, v, generator=g, requires_grad=True)
    ids = torch.randint(0, v, (b, t))
    topk_ids = torch.randint(0, v, (b, t, 2), generator=g)
    mask = torch.tensor([[False, True, True, True], [False, True, False, False]])
    lp = torch.zeros(b, t)
    rows = _Rows(
        ids, torch.ones(b, t, dtype=torch.bool), mask, lp, lp, None,
        topk_ids, torch.log_softmax(torch.randn(b, t, 2, generator=g), -1), [0, 0],
    )  # fmt: skip
    o = ObjectiveConfig(kind="toy")
    obj = objective.get_objective(o.kind)
    assert obj is toy
    student_topk = student_topk_logprobs(obj, o, logits, rows)
    assert student_topk is not None and torch.equal(student_topk, logprobs_at(logits, topk_ids))
    loss, stat = domain_loss(obj, o, rows, [0, 1], lp, student_topk)
    want, _ = toy.loss(objective.LossInputs(lp, lp, lp, mask, None, student_topk, rows.topk_logprobs), o)
    assert torch.equal(loss, want)
    assert stat.tolist() == [4.0, 4.0, 0.0, 0.0, 0.0]  # adv_mean: 0 for a loss without an advantage
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_the_trainers_domain_loss_keeps_each_builtin_objective_bitwise():
    """The trainer's metric sums per domain are those it computed inline before the registry:
    tokens, reverse_kl, is_masked_frac and adv_mean (0 for top-k) times tokens, |train - rollout|."""
    from trainers.deepspeed_trainer import _Rows, domain_loss

    x = _loss_inputs(seed=5)
    b, t, k = x.student_topk.shape
    rows = _Rows(
        torch.zeros(b, t, dtype=torch.long), torch.ones(b, t, dtype=torch.bool), x.response_mask, x.rollout,
        x.teacher, x.adv_orm, torch.zeros(b, t, k, dtype=torch.long), x.teacher_topk, [0, 1, 0],
    )  # fmt: skip
    idx = [0, 2]
    sub = objective.LossInputs(
        x.logp_train[idx], x.rollout[idx], x.teacher[idx], x.response_mask[idx], x.adv_orm[idx],
        x.student_topk[idx], x.teacher_topk[idx],
    )  # fmt: skip
    for kind in ("sampled", "topk"):
        o = ObjectiveConfig(kind=kind, alpha=0.5 if kind == "sampled" else 0.0)
        loss, stat = domain_loss(objective.get_objective(kind), o, rows, idx, x.logp_train, x.student_topk)
        want, m = _direct(kind, sub, o)
        n = m["num_tokens"]
        abs_diff = float(((sub.logp_train.detach() - sub.rollout).abs() * sub.response_mask).sum())
        adv = m["adv_mean"] if kind == "sampled" else 0.0
        assert torch.equal(loss, want), kind
        assert stat.tolist() == [n, m["reverse_kl"] * n, m["is_masked_frac"] * n, adv * n, abs_diff], kind


def test_a_registered_objective_is_a_valid_recipe_choice(toy):
    """The recipe's objective.kind choices are the registry's: a new kind needs no schema edit."""
    from pathlib import Path

    from mopd.config import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    assert load_config(tiny, ["objective.kind=toy"]).objective.kind == "toy"
    with pytest.raises(ConfigError, match=r"objective.kind is 'toyy'; valid: sampled, topk, toy$"):
        load_config(tiny, ["objective.kind=toyy"])


def test_the_memory_plan_counts_what_the_objective_keeps(toy, monkeypatch):
    """The trainer's logits estimate adds the objective's ``extra_logit_bytes`` per logit (8 for top-k)."""
    from mopd.dist.plan import plan_recipe
    from test_plan import dense_recipe

    def logits(kind: str) -> float:
        cfg = dense_recipe()
        cfg.objective.kind = kind
        return plan_recipe(cfg).actors[0].parts["logits"]

    per_logit = 4 * 32 * 128  # B x T x V of dense_recipe
    assert logits("topk") - logits("sampled") == 8 * per_logit
    monkeypatch.setattr(_Toy, "extra_logit_bytes", lambda self, o: 3)
    assert logits("toy") - logits("sampled") == 3 * per_logit
