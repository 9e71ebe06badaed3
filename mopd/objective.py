"""The MOPD objective (MiMo-V2-Flash report, Eqs. 7-9) and its top-k variant.

All tensors are aligned on response tokens: position t of every (B, T) input refers to the same
sampled token. Only ``logp_train`` (or the student's top-k log-probs) carries gradient; everything
else, including the importance weight and the advantage, is treated as a constant.

    o = cfg.objective   # every coefficient is the recipe's: the defaults live in mopd/config.py only
    loss, metrics = mopd_loss(logp_train, logp_rollout, logp_teacher, response_mask, adv_orm,
                              eps_low=o.eps_low, eps_high=o.eps_high, alpha=o.alpha, adv_clip=o.adv_clip)
"""

from __future__ import annotations

import torch

Metrics = dict[str, float]


def _is_weights(
    logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """IcePop-style weight: the trainer/rollout ratio inside [eps_low, eps_high], 0 outside (masked,
    not clipped). Returns (w (B, T) f32, in_band (B, T) bool); padding gets w = 0."""
    logp_rollout = logp_rollout.detach()
    log_ratio = torch.where(mask, logp_train.detach() - logp_rollout, torch.zeros_like(logp_rollout))
    ratio = torch.exp(log_ratio)
    in_band = mask & (ratio >= eps_low) & (ratio <= eps_high)
    return torch.where(in_band, ratio, torch.zeros_like(ratio)), in_band


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence 1/|y| sum, then mean over sequences with at least one response token.

    A sequence with no response tokens contributes nothing (and no NaN). With no response token in
    the whole batch the result is a zero that keeps the graph, so backward still works."""
    lengths = mask.sum(dim=-1)
    per_seq = (per_token * mask).sum(dim=-1) / lengths.clamp(min=1)
    has_tokens = lengths > 0
    n = has_tokens.sum()
    if n == 0:
        return (per_token * 0.0).sum()
    return per_seq[has_tokens].sum() / n


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float((x.detach() * mask).sum() / n) if n else 0.0


def _check_shapes(response_mask: torch.Tensor, *tensors: torch.Tensor) -> None:
    if response_mask.dtype != torch.bool:
        raise TypeError(f"response_mask must be bool, got {response_mask.dtype}")
    for t in tensors:
        if t.shape != response_mask.shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs response_mask {tuple(response_mask.shape)}")


def mopd_loss(
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    logp_teacher: torch.Tensor,
    response_mask: torch.Tensor,
    adv_orm: torch.Tensor | None = None,
    *,
    eps_low: float,
    eps_high: float,
    alpha: float,
    adv_clip: float,
) -> tuple[torch.Tensor, Metrics]:
    """The sampled-token MOPD surrogate loss.

    Args:
        logp_train: (B, T) f32, log pi_theta(y_t) from the training engine, with grad.
        logp_rollout: (B, T) f32, log mu_theta(y_t) recorded by the inference engine.
        logp_teacher: (B, T) f32, log pi_d(y_t) from the teacher of the row's domain.
        response_mask: (B, T) bool, True on response tokens.
        adv_orm: (B,) f32 sequence-level outcome advantage (e.g. ``grpo_advantages``), or None.

    Returns the scalar loss
        - mean_seq (1/|y|) sum_t w_t * A_t * logp_train_t,
        w_t = ratio_t if eps_low <= ratio_t <= eps_high else 0,  ratio_t = exp(logp_train - logp_rollout),
        A_t = clip(logp_teacher - logp_train, +-adv_clip) + alpha * adv_orm   (w and A detached),
    and metrics: reverse_kl (mean token estimate of KL(pi_theta || pi_d)), is_masked_frac,
    adv_mean, adv_clipped_frac, train_rollout_abs_diff, num_tokens.
    """
    _check_shapes(response_mask, logp_train, logp_rollout, logp_teacher)
    mask = response_mask
    w, in_band = _is_weights(logp_train, logp_rollout, mask, eps_low, eps_high)
    zeros = torch.zeros_like(logp_rollout)
    token_log_ratio = torch.where(mask, logp_teacher.detach() - logp_train.detach(), zeros)
    token_adv = token_log_ratio.clamp(-adv_clip, adv_clip)
    adv = token_adv
    if adv_orm is not None and alpha != 0.0:
        if adv_orm.shape != mask.shape[:1]:
            raise ValueError(f"adv_orm must have shape ({mask.shape[0]},), got {tuple(adv_orm.shape)}")
        adv = adv + alpha * adv_orm.detach().to(adv.dtype)[:, None]
    logp_masked = torch.where(mask, logp_train, torch.zeros_like(logp_train))
    loss = -_sequence_mean(w * adv * logp_masked, mask)

    fmask = mask.float()
    n_tok = int(mask.sum())
    metrics = {
        "reverse_kl": _masked_mean(-token_log_ratio, fmask),
        "is_masked_frac": (1.0 - float(in_band.sum()) / n_tok) if n_tok else 0.0,
        "adv_mean": _masked_mean(adv, fmask),
        "adv_clipped_frac": _masked_mean((token_log_ratio.abs() > adv_clip).float(), fmask),
        "train_rollout_abs_diff": _masked_mean(
            torch.where(mask, (logp_train.detach() - logp_rollout.detach()).abs(), zeros), fmask
        ),
        "num_tokens": float(n_tok),
    }
    return loss, metrics


def topk_reverse_kl_loss(
    student_topk_logp: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    logp_train: torch.Tensor,
    logp_rollout: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    forward_kl: float,
) -> tuple[torch.Tensor, Metrics]:
    """Per-position reverse KL on the teacher's top-k support (the lower-variance variant), plus
    ``forward_kl`` times the forward KL on the same support.

    Args:
        student_topk_logp: (B, T, K) f32 student log-probs (with grad) at the teacher's top-k ids.
        teacher_topk_logp: (B, T, K) f32 teacher log-probs at those ids.
        logp_train, logp_rollout: (B, T) f32, used only for the IS mask (as in ``mopd_loss``).
        response_mask: (B, T) bool.

    Both distributions are renormalised over the K ids; the loss is
    mean_seq (1/|y|) sum_t w_t * [KL(p_s || p_t) + forward_kl * KL(p_t || p_s)] at t. With K =
    vocabulary size this is the exact per-position reverse KL (forward_kl = 0).

    Why a forward term: the reverse KL's gradient w.r.t. the student's logit of a token is
    p_s(token) * (log p_s(token) - log p_t(token) - KL), so where the student is confidently wrong
    (it gives the teacher's token ~1e-5) the push towards that token vanishes, and the student
    stays wrong. The forward KL's gradient there is p_s - p_t: about -1 on the teacher's token,
    whatever the student believes. Both vanish when p_s = p_t. forward_kl = 1 is the symmetric
    (Jeffreys) divergence.
    """
    _check_shapes(response_mask, logp_train, logp_rollout)
    if student_topk_logp.shape != teacher_topk_logp.shape or student_topk_logp.shape[:2] != response_mask.shape:
        raise ValueError(
            f"top-k shapes {tuple(student_topk_logp.shape)} / {tuple(teacher_topk_logp.shape)} "
            f"do not match response_mask {tuple(response_mask.shape)}"
        )
    mask = response_mask
    w, in_band = _is_weights(logp_train, logp_rollout, mask, eps_low, eps_high)
    log_ps = torch.log_softmax(student_topk_logp, dim=-1)
    log_pt = torch.log_softmax(teacher_topk_logp.detach(), dim=-1)
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    per_token = kl
    metrics: Metrics = {}
    if forward_kl > 0:
        fwd = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        fwd = torch.where(mask, fwd, torch.zeros_like(fwd))
        per_token = kl + forward_kl * fwd
        metrics["forward_kl"] = _masked_mean(fwd, mask.float())
    loss = _sequence_mean(w * per_token, mask)
    n_tok = int(mask.sum())
    metrics = {
        **metrics,
        "reverse_kl": _masked_mean(kl, mask.float()),
        "is_masked_frac": (1.0 - float(in_band.sum()) / n_tok) if n_tok else 0.0,
        "topk_mass": _masked_mean(student_topk_logp.detach().exp().sum(-1), mask.float()),
        "num_tokens": float(n_tok),
    }
    return loss, metrics


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage: (reward - group mean) / (group std + eps); 0 for singleton groups.

    Args:
        rewards: (N,) float, one verifier reward per response.
        group_ids: (N,) int, equal for the n samples of one prompt.
    The std is the population std (unbiased=False), so two samples with rewards 1 and 0 get +-1.
    """
    rewards = rewards.float()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    sums = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards)
    mean = sums / counts
    sq = torch.zeros(n_groups, dtype=rewards.dtype).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    std = (sq / counts).sqrt()
    adv = (rewards - mean[inverse]) / (std[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))
