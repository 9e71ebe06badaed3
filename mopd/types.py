"""The data that crosses actor boundaries, with the shape of every field.

Layout of a batch of B trajectories, T = P + R columns: each prompt is left-padded to P columns and
each response right-padded to R columns, so every response starts at column P. Position t of every
(B, T) tensor refers to token ``input_ids[:, t]`` (its log-prob is conditioned on columns < t).
A multi-turn trajectory (a domain with an environment) keeps all its turns in its response region:
the student's sampled tokens (``response_mask`` True) interleaved with context tokens (tool results,
template glue: ``attention_mask`` True, ``response_mask`` False, rollout log-prob 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mopd.envs.base import TrajectoryStats


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if tuple(t.shape[: len(shape)]) != shape:
        raise ValueError(f"{name}: expected shape {shape}..., got {tuple(t.shape)}")


@dataclass
class PromptRow:
    """One prompt drawn from a data source: text, or chat messages (``messages``, set for sources
    with ``messages_key``, or with ``prompt_as_user``: the text as one user turn; ``prompt`` then
    holds them rendered with the chat template, for reading). ``mopd.chat.prompt_ids`` gives the
    token ids the student sees."""

    prompt: str
    domain: str
    # Whatever the domain's verifier needs (e.g. the exact answer); opaque to the loop.
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    index: int = 0
    messages: list[dict[str, Any]] | None = None
    # The verifier named by the row's data source (``data.sources[i].verifier``: a built-in name or
    # ``package.module:function``); None: the domain's registered verifier.
    verifier: str | None = None


@dataclass
class RolloutBatch:
    """Student trajectories as produced by a rollout pool.

    input_ids        (B, T) int64  prompt (left-padded) + response (right-padded), pad = pad_id
    attention_mask   (B, T) bool   True on real tokens (prompt and response)
    response_mask    (B, T) bool   True on tokens the student sampled, each turn's stop token (EOS,
                                   end-of-turn) included; False on prompt, padding and context tokens
    rollout_logprobs (B, T) f32    log mu_theta(token) under the distribution actually sampled from
                                   (temperature / top-p applied); 0 outside the response
    group_ids        (B,)   int64  equal for the n samples of one prompt
    domains          list[str]     domain of each row (routes it to a teacher)
    rows             list[PromptRow]
    responses        list[str]     decoded responses (no special tokens)
    policy_version   int           student weights version that generated the batch
    prompt_len       int           P, the column where responses start
    routed_experts   (B, T, L, k) int16 or None: experts each MoE layer chose (routing replay)
    truncated        (B,)   bool or None: True where the response reached rollout.max_new_tokens
                                   without a stop token, or a multi-turn trajectory was stopped by a
                                   limit (None: not recorded, e.g. a batch built by hand)
    episodes         list[TrajectoryStats | None] or None: per trajectory, what its environment saw
                                   (turns, tool calls, errors, reward, ``stop``); None on one-turn rows
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    group_ids: torch.Tensor
    domains: list[str]
    rows: list[PromptRow]
    responses: list[str]
    policy_version: int
    prompt_len: int
    routed_experts: torch.Tensor | None = None
    truncated: torch.Tensor | None = None
    episodes: list[TrajectoryStats | None] | None = None

    def __post_init__(self) -> None:
        B, T = self.input_ids.shape
        _check("input_ids", self.input_ids, (B, T), torch.int64)
        _check("attention_mask", self.attention_mask, (B, T), torch.bool)
        _check("response_mask", self.response_mask, (B, T), torch.bool)
        _check("rollout_logprobs", self.rollout_logprobs, (B, T), torch.float32)
        _check("group_ids", self.group_ids, (B,), torch.int64)
        if not (len(self.domains) == len(self.rows) == len(self.responses) == B):
            raise ValueError(f"domains/rows/responses must have {B} entries")
        if self.routed_experts is not None and tuple(self.routed_experts.shape[:2]) != (B, T):
            raise ValueError(f"routed_experts: expected ({B}, {T}, L, k), got {tuple(self.routed_experts.shape)}")
        if self.truncated is not None:
            _check("truncated", self.truncated, (B,), torch.bool)
        if self.episodes is not None and len(self.episodes) != B:
            raise ValueError(f"episodes must have {B} entries, got {len(self.episodes)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: list[int]) -> RolloutBatch:
        """The rows ``idx``, in that order."""
        t = torch.as_tensor(idx, dtype=torch.long)
        return RolloutBatch(
            input_ids=self.input_ids[t],
            attention_mask=self.attention_mask[t],
            response_mask=self.response_mask[t],
            rollout_logprobs=self.rollout_logprobs[t],
            group_ids=self.group_ids[t],
            domains=[self.domains[i] for i in idx],
            rows=[self.rows[i] for i in idx],
            responses=[self.responses[i] for i in idx],
            policy_version=self.policy_version,
            prompt_len=self.prompt_len,
            routed_experts=None if self.routed_experts is None else self.routed_experts[t],
            truncated=None if self.truncated is None else self.truncated[t],
            episodes=None if self.episodes is None else [self.episodes[i] for i in idx],
        )


@dataclass
class TeacherScores:
    """A teacher's scores of a batch, aligned with its ``RolloutBatch``.

    logprobs       (B, T) f32        log pi_d(token) at temperature 1; 0 outside the response
    topk_ids       (B, T, K) int64   teacher's top-k token ids per position, or None
    topk_logprobs  (B, T, K) f32     their log-probs, or None
    latency_s      float             wall time the scoring took on the actor
    """

    logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        _check("logprobs", self.logprobs, tuple(self.logprobs.shape), torch.float32)
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("topk_ids and topk_logprobs go together")
        if self.topk_ids is not None and self.topk_logprobs is not None:
            B, T = self.logprobs.shape
            _check("topk_ids", self.topk_ids, (B, T), torch.int64)
            _check("topk_logprobs", self.topk_logprobs, (B, T), torch.float32)


@dataclass
class TrainBatch:
    """What one trainer step consumes: a rollout batch plus teacher scores and outcome advantages.

    teacher_logprobs      (B, T) f32
    adv_orm               (B,) f32 or None
    teacher_topk_ids      (B, T, K) int64 or None
    teacher_topk_logprobs (B, T, K) f32 or None
    """

    rollout: RolloutBatch
    teacher_logprobs: torch.Tensor
    adv_orm: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        B, T = self.rollout.input_ids.shape
        _check("teacher_logprobs", self.teacher_logprobs, (B, T), torch.float32)
        if self.adv_orm is not None:
            _check("adv_orm", self.adv_orm, (B,), torch.float32)
