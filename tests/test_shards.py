"""Per-rank batches (trainers/shards.py): each trainer rank gets its own rows' tensors, nothing else.

    pytest tests/test_shards.py        # a few seconds, CPU, no Ray

Batches come from tests/test_trainer.py's ``make_batch`` (tiny student, random rows of varied length).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_trainer import make_batch, make_cfg
from trainers.shards import RankBatch, micro_batch_count, shard_batch

TENSORS = ("input_ids", "attention_mask", "response_mask", "rollout_logprobs", "teacher_logprobs")


@pytest.fixture(scope="module")
def batch():
    return make_batch(make_cfg(), rows=7)


def test_shards_partition_the_rows_strided_by_rank(batch):
    shards = shard_batch(batch, world_size=3, micro_batch_size=2)
    assert [s.rows.tolist() for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(s) for s in shards] == [3, 2, 2]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_shard_holds_exactly_its_rows_tensors(batch, world_size):
    """The kept columns equal the batch's; the dropped ones are padding in all the shard's rows."""
    r = batch.rollout
    for s in shard_batch(batch, world_size, micro_batch_size=2):
        rows = s.rows
        mask = r.attention_mask[rows]
        real = mask.any(0).nonzero().flatten()
        lo, hi = int(real[0]), int(real[-1]) + 1
        assert s.input_ids.shape == (len(rows), hi - lo)
        whole = dict(
            input_ids=r.input_ids, attention_mask=r.attention_mask, response_mask=r.response_mask,
            rollout_logprobs=r.rollout_logprobs, teacher_logprobs=batch.teacher_logprobs,
            teacher_topk_ids=batch.teacher_topk_ids, teacher_topk_logprobs=batch.teacher_topk_logprobs,
        )  # fmt: skip
        for name, full in whole.items():
            assert torch.equal(getattr(s, name), full[rows, lo:hi]), name
        assert torch.equal(s.adv_orm, batch.adv_orm[rows])
        assert [s.domains[i] for i in s.domain_ids.tolist()] == [r.domains[i] for i in rows.tolist()]
        dropped = torch.ones(r.input_ids.shape[1], dtype=torch.bool)
        dropped[lo:hi] = False
        assert not mask[:, dropped].any()


def test_shards_carry_no_strings_and_no_view_of_the_batch(batch):
    """Tensors, numbers and the batch's distinct domain names only: no prompts, responses,
    PromptRows or meta, and no tensor that shares (and would pickle) the whole batch's storage."""
    for s in shard_batch(batch, world_size=2, micro_batch_size=2):
        for f in dataclasses.fields(RankBatch):
            value = getattr(s, f.name)
            if f.name == "domains":
                assert value == ("code", "math")  # one name per domain, not per row
            elif isinstance(value, torch.Tensor):
                if f.name in TENSORS:
                    assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), f.name
            elif f.name == "plan":
                assert value is None  # row chunks; a token budget's plan is lists of ints
            else:
                assert value is None or isinstance(value, int | bool), (f.name, type(value))


def test_shards_carry_the_whole_batch_numbers(batch):
    """The loss is a mean over the whole batch's sequences, the SFT loss over its tokens: every rank
    gets those counts, and the same micro-batch count (its ZeRO collectives must match)."""
    resp = batch.rollout.response_mask
    shards = shard_batch(batch, world_size=2, micro_batch_size=2)
    for s in shards:
        assert s.batch_rows == 7
        assert s.batch_sequences == int((resp.sum(-1) > 0).sum())
        assert s.batch_tokens == int(resp.sum())
        assert s.micro_batches == micro_batch_count(7, 2, 2) == 2


def test_fewer_rows_than_ranks_gives_a_padding_shard():
    b = make_batch(make_cfg(), rows=1)
    real, pad = shard_batch(b, world_size=2, micro_batch_size=4)
    assert len(real) == 1 and not real.padding
    # Holds one borrowed row for its zero-weight passes, but trains on none.
    assert pad.padding and len(pad) == 0 and pad.input_ids.shape[0] == 1


def test_an_empty_batch_is_refused(batch):
    with pytest.raises(ValueError, match="empty batch"):
        shard_batch(batch.__class__(batch.rollout.select([]), batch.teacher_logprobs[:0]), 2, 2)
