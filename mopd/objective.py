"""The MOPD objective (MiMo-V2-Flash report, Eqs. 7-9) and its top-k variant.

All tensors are aligned on response tokens: position t of every (B, T) input refers to the same
sampled token. Only ``logp_train`` (or the student's top-k log-probs) carries gradient; everything
else, including the importance weight and the advantage, is treated as a constant.

    o = cfg.objective   # every coefficient is the recipe's: the defaults live in mopd/config.py only
    loss, metrics = mopd_loss(logp_train, logp_rollout, logp_teacher, response_mask, adv_orm,
                              eps_low=o.eps_low, eps_high=o.eps_high, alpha=o.alpha, adv_clip=o.adv_clip)

Which loss a run trains with is ``objective.kind``: an ``Objective`` registered under that name. The
loop, the app, the memory plan, the config checks and the trainer ask it (never branch on the kind)
what to fetch from the teachers, whether the verifier's reward is needed, and for the loss:

    obj = get_objective(o.kind)           # ValueError naming the registered kinds
    k = obj.teacher_topk(o)               # top-k to request from the teachers (0: none)
    loss, metrics = obj.loss(LossInputs(logp_train, logp_rollout, logp_teacher, response_mask, adv_orm), o)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from mopd.config import ObjectiveConfig

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


def _sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence 1/|y| sum, then mean over sequences with at least one response token.

    A sequence with no response tokens contributes nothing (and no NaN). With no response token in
    the whole batch the result is a zero that keeps the graph, so backward still works. ``lengths``
    (B,): each whole sequence's |y| where ``mask`` holds only a part of its tokens (a sequence-
    parallel slice: the parts' results then add up to the whole's); None: ``mask.sum(-1)``."""
    if lengths is None:
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
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """The sampled-token MOPD surrogate loss.

    Args:
        logp_train: (B, T) f32, log pi_theta(y_t) from the training engine, with grad.
        logp_rollout: (B, T) f32, log mu_theta(y_t) recorded by the inference engine.
        logp_teacher: (B, T) f32, log pi_d(y_t) from the teacher of the row's domain.
        response_mask: (B, T) bool, True on response tokens.
        adv_orm: (B,) f32 sequence-level outcome advantage (e.g. ``grpo_advantages``), or None.
        lengths: (B,) response tokens of each whole sequence when ``response_mask`` marks only
            part of them (``LossInputs.lengths``); None: ``response_mask.sum(-1)``.

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
    loss = -_sequence_mean(w * adv * logp_masked, mask, lengths)

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
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Per-position reverse KL on the teacher's top-k support (the lower-variance variant), plus
    ``forward_kl`` times the forward KL on the same support.

    Args:
        student_topk_logp: (B, T, K) f32 student log-probs (with grad) at the teacher's top-k ids.
        teacher_topk_logp: (B, T, K) f32 teacher log-probs at those ids.
        logp_train, logp_rollout: (B, T) f32, used only for the IS mask (as in ``mopd_loss``).
        response_mask: (B, T) bool.
        lengths: (B,) or None, as in ``mopd_loss``.

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
    loss = _sequence_mean(w * per_token, mask, lengths)
    n_tok = int(mask.sum())
    metrics = {
        **metrics,
        "reverse_kl": _masked_mean(kl, mask.float()),
        "is_masked_frac": (1.0 - float(in_band.sum()) / n_tok) if n_tok else 0.0,
        "topk_mass": _masked_mean(student_topk_logp.detach().exp().sum(-1), mask.float()),
        "num_tokens": float(n_tok),
    }
    return loss, metrics


# --------------------------------------------------------------------------- objectives by kind


@dataclass(frozen=True)
class LossInputs:
    """One domain's rows of a micro-batch, aligned on response tokens (see the module docstring).

    logp_train (b, t) f32 with grad; rollout (b, t) f32 (the inference engine's log-probs); teacher
    (b, t) f32 (the domain teacher's log-prob of the sampled token); response_mask (b, t) bool;
    adv_orm (b,) f32 or None (the GRPO outcome advantage, when the objective uses the verifier);
    student_topk (b, t, K) f32 with grad and teacher_topk (b, t, K) f32: log-probs at the teacher's
    top-k ids, or None when the objective asks for no top-k. lengths (b,) int64 or None: with
    sequence parallelism (``trainer.sequence_parallel_size``) ``response_mask`` marks only the
    tokens this rank scored and ``lengths`` holds each whole row's response-token count, the
    denominator of the per-sequence mean, so that the ranks' losses add up to the whole rows'
    (an objective must pass it to its mean); None: ``response_mask.sum(-1)``.
    """

    logp_train: torch.Tensor
    rollout: torch.Tensor
    teacher: torch.Tensor
    response_mask: torch.Tensor
    adv_orm: torch.Tensor | None = None
    student_topk: torch.Tensor | None = None
    teacher_topk: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


class Objective(ABC):
    """One ``objective.kind``: what its loss needs (the teachers' top-k, the verifier) and the loss.

    A new loss is a subclass registered with ``register_objective``; nothing else branches on the
    kind. The methods take the recipe's ``objective`` section, which holds every coefficient."""

    kind: ClassVar[str]

    def teacher_topk(self, o: ObjectiveConfig) -> int:
        """Log-probs per position to request from the teachers at their top-k ids (0: none; the
        trainer then computes no student top-k either)."""
        return 0

    def uses_outcome_reward(self, o: ObjectiveConfig) -> bool:
        """Whether the loss reads ``adv_orm``: then the loop runs the verifiers, and every data
        domain needs one."""
        return False

    def extra_logit_bytes(self, o: ObjectiveConfig) -> int:
        """Bytes per logit (row x token x vocabulary entry) the loss keeps alive in the backward
        beyond the sampled token's log-softmax (``mopd.dist.plan``), on the full-logits path
        (``trainer.logprob_chunk_size: 0``); chunked, every id is scored from one chunk's logits."""
        return 0

    def check(self, o: ObjectiveConfig) -> list[str]:
        """Settings that do nothing or cannot work with this kind: one message each, saying what to set."""
        return []

    @abstractmethod
    def loss(self, x: LossInputs, o: ObjectiveConfig) -> tuple[torch.Tensor, Metrics]:
        """The scalar loss of these rows, a mean over the sequences with a response token (the
        trainer weights it by their number), and metrics with at least ``num_tokens`` and the
        token means ``reverse_kl`` and ``is_masked_frac`` (``adv_mean`` too if it has an advantage;
        the trainer reports 0 without)."""


class SampledObjective(Objective):
    """The report's sampled-token surrogate (``mopd_loss``), plus ``alpha`` times the verifier's
    GRPO advantage."""

    kind = "sampled"

    def uses_outcome_reward(self, o: ObjectiveConfig) -> bool:
        return o.alpha > 0

    def check(self, o: ObjectiveConfig) -> list[str]:
        if o.forward_kl > 0:
            return [
                f"objective.forward_kl={o.forward_kl} needs objective.kind=topk (the forward KL needs the "
                f"teacher's distribution, which the sampled form does not fetch); set objective.forward_kl=0"
            ]
        return []

    def loss(self, x: LossInputs, o: ObjectiveConfig) -> tuple[torch.Tensor, Metrics]:
        return mopd_loss(
            x.logp_train, x.rollout, x.teacher, x.response_mask, x.adv_orm,
            eps_low=o.eps_low, eps_high=o.eps_high, alpha=o.alpha, adv_clip=o.adv_clip, lengths=x.lengths,
        )  # fmt: skip


class TopKObjective(Objective):
    """Reverse KL (plus ``forward_kl`` times the forward KL) on the teacher's top-k support
    (``topk_reverse_kl_loss``)."""

    kind = "topk"

    def teacher_topk(self, o: ObjectiveConfig) -> int:
        return o.topk

    def extra_logit_bytes(self, o: ObjectiveConfig) -> int:
        return 8  # a second fp32 log-softmax over the vocabulary and its gradient

    def check(self, o: ObjectiveConfig) -> list[str]:
        if o.alpha > 0:
            return [
                f"objective.alpha={o.alpha} does nothing with objective.kind=topk (the top-k loss has no "
                "outcome-advantage term, so the verifier's reward would be computed and dropped); set "
                "objective.alpha=0, or objective.kind=sampled to train on the verifier's reward"
            ]
        return []

    def loss(self, x: LossInputs, o: ObjectiveConfig) -> tuple[torch.Tensor, Metrics]:
        if x.student_topk is None or x.teacher_topk is None:
            raise ValueError("objective.kind is 'topk' but the TrainBatch has no teacher_topk_ids/logprobs")
        return topk_reverse_kl_loss(
            x.student_topk, x.teacher_topk, x.logp_train, x.rollout, x.response_mask,
            eps_low=o.eps_low, eps_high=o.eps_high, forward_kl=o.forward_kl, lengths=x.lengths,
        )  # fmt: skip


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(obj: Objective) -> Objective:
    """Make ``obj`` the objective of ``objective.kind: <obj.kind>``; a kind registers once."""
    existing = _OBJECTIVES.get(obj.kind)
    if existing is not None:
        raise ValueError(
            f"objective kind {obj.kind!r} is already registered ({type(existing).__qualname__}); "
            f"registered: {', '.join(objective_kinds())}"
        )
    _OBJECTIVES[obj.kind] = obj
    return obj


def objective_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order (the built-ins first)."""
    return tuple(_OBJECTIVES)


def get_objective(kind: str) -> Objective:
    """The objective registered as ``kind``; ValueError naming the valid kinds if there is none."""
    obj = _OBJECTIVES.get(kind)
    if obj is None:
        raise ValueError(f"objective.kind is {kind!r}; valid: {', '.join(objective_kinds())}")
    return obj


register_objective(SampledObjective())
register_objective(TopKObjective())


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
