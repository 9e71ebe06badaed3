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
