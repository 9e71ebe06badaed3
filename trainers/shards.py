"""One trainer rank's share of a ``TrainBatch``: only the tensors of its own rows, plus the few
whole-batch numbers that the loss normalisation and the reduced metrics need.

    shards = shard_batch(train_batch, world_size=2)    # [RankBatch for rank 0, RankBatch for rank 1]
    worker.train_step(shards[rank])                    # what TrainerPool sends each rank (own ref)

Rank r trains on rows ``r::world_size`` of the batch (rank 0 holds the most rows), or, with a token
budget (``max_tokens``), on rows ``r::world_size`` of the batch sorted by length, so that ranks get
similar token loads, cut into micro-batches by ``mopd.batching.token_budget_groups``. A shard carries no
prompts, responses, ``PromptRow``s or their meta: rows are tensors, and a row's domain is an index
into the batch's sorted domain names (the only strings, one per domain, for the metric keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mopd.batching import longest_first, row_spans, token_budget_groups
from mopd.types import TrainBatch


@dataclass
class RankBatch:
    """The rows of a ``TrainBatch`` one rank trains on, columns that are padding in all of them
    dropped (positions come from the attention mask, so the results do not change).

    rows                  (b,) int64        indices of these rows in the whole batch
    input_ids             (b, t) int64
    attention_mask        (b, t) bool
    response_mask         (b, t) bool
    rollout_logprobs      (b, t) f32
    teacher_logprobs      (b, t) f32
    domain_ids            (b,) int64        index into ``domains``
    adv_orm               (b,) f32 or None
    teacher_topk_ids      (b, t, K) int64 or None
    teacher_topk_logprobs (b, t, K) f32 or None
    routed_experts        (b, t, L, k) int16 or None

    Whole-batch numbers, equal on every rank:
    domains          tuple[str, ...]  the batch's distinct domains, sorted (metric keys)
    batch_rows       int   B, rows of the whole batch
    batch_sequences  int   rows of the whole batch with >= 1 response token (the objective's mean)
    batch_tokens     int   response tokens of the whole batch (the SFT token mean)
    micro_batches    int   forward/backward passes every rank makes (ZeRO collectives must match)

    plan: with a token budget, this rank's micro-batches as lists of its row positions (0..b-1);
    None: chunks of the micro-batch size in row order.

    A rank with no rows (B < world size) gets one row of the batch as ``rows`` with ``padding``
    True: its passes then run on that row with zero weight.
    """

    rows: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    domain_ids: torch.Tensor
    adv_orm: torch.Tensor | None
    teacher_topk_ids: torch.Tensor | None
    teacher_topk_logprobs: torch.Tensor | None
    routed_experts: torch.Tensor | None
    domains: tuple[str, ...]
    batch_rows: int
    batch_sequences: int
    batch_tokens: int
    micro_batches: int
    padding: bool = False
    plan: list[list[int]] | None = None

    def __len__(self) -> int:
        """Rows this rank trains on (0 for a padding shard)."""
        return 0 if self.padding else self.input_ids.shape[0]


def micro_batch_count(batch_rows: int, world_size: int, micro_batch_size: int) -> int:
    """Passes per rank: rank 0's rows (the most) in chunks of ``micro_batch_size``."""
    return math.ceil(math.ceil(batch_rows / world_size) / micro_batch_size)


def shard_batch(
    batch: TrainBatch, world_size: int, micro_batch_size: int, max_tokens: int = 0, packed: bool = False
) -> list[RankBatch]:
    """One ``RankBatch`` per rank; rank r gets rows ``r::world_size``, in micro-batches of
    ``micro_batch_size`` rows, or with ``max_tokens`` > 0 rows ``r::world_size`` of the batch sorted
    by length, in micro-batches of at most ``max_tokens`` padded positions (``packed``: real tokens,
    the trainer laying each micro-batch's rows end to end; see the module doc)."""
    B = len(batch.rollout)
    if B == 0:
        raise ValueError("train_step got an empty batch")
    r = batch.rollout
    domains = tuple(sorted(set(r.domains)))
    domain_ids = torch.tensor([domains.index(d) for d in r.domains], dtype=torch.int64)
    plans: list[list[list[int]] | None]
    if max_tokens > 0:
        spans = row_spans(r.attention_mask)
        by_length = longest_first(spans)
        owns = [sorted(by_length[rank::world_size]) for rank in range(world_size)]
        plans = [token_budget_groups([spans[i] for i in own], max_tokens, packed) if own else [] for own in owns]
        micro_batches = max(max(len(p or []) for p in plans), 1)
    else:
        owns = [list(range(rank, B, world_size)) for rank in range(world_size)]
        plans = [None] * world_size
        micro_batches = micro_batch_count(B, world_size, micro_batch_size)
    whole = dict(
        domains=domains,
        batch_rows=B,
        batch_sequences=int((r.response_mask.sum(-1) > 0).sum()),
        batch_tokens=int(r.response_mask.sum()),
        micro_batches=micro_batches,
    )
    return [
        _take(batch, own or [0], domain_ids, padding=not own, plan=plan if own else None, **whole)
        for own, plan in zip(owns, plans, strict=True)
    ]


def _take(batch: TrainBatch, rows: list[int], domain_ids: torch.Tensor, **whole) -> RankBatch:
    t = torch.as_tensor(rows, dtype=torch.long)
    r = batch.rollout
    lo, hi = _real_columns(r.attention_mask[t])

    def cols(x: torch.Tensor) -> torch.Tensor:
        return x[t, lo:hi]  # advanced indexing copies: no view that would pickle the whole batch

    def maybe(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else cols(x)

    return RankBatch(
        rows=t, input_ids=cols(r.input_ids), attention_mask=cols(r.attention_mask),
        response_mask=cols(r.response_mask), rollout_logprobs=cols(r.rollout_logprobs),
        teacher_logprobs=cols(batch.teacher_logprobs), domain_ids=domain_ids[t],
        adv_orm=None if batch.adv_orm is None else batch.adv_orm[t],
        teacher_topk_ids=maybe(batch.teacher_topk_ids), teacher_topk_logprobs=maybe(batch.teacher_topk_logprobs),
        routed_experts=maybe(r.routed_experts), **whole,
    )  # fmt: skip


def _real_columns(attention_mask: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) spanning every column that is a real token in some row (all columns if none is)."""
    real = attention_mask.any(dim=0).nonzero()
    return (int(real[0]), int(real[-1]) + 1) if len(real) else (0, attention_mask.shape[1])
