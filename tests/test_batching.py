"""Rows grouped by length under a token budget, and rows packed end to end (mopd/batching.py): the
groups the trainer's micro-batches and the HF teacher's passes use with
``max_tokens_per_micro_batch`` / ``max_tokens_per_batch``, and ``trainer.pack_sequences``.

    pytest tests/test_batching.py      # a few seconds, CPU
"""

from __future__ import annotations

import random

import pytest
import torch

from mopd.batching import PackedRows, padded_size, row_spans, token_budget_groups
from mopd.config import BUILTIN_TOKENIZER, ModelConfig
from mopd.models import CHAR_VOCAB_SIZE, forward_logits, load_model, tiny_mimo_config, token_logprobs
from test_routing import tiny_qwen3_moe_config

PROMPT = 8


def left_right_padded(prompt_lens: list[int], response_lens: list[int]) -> torch.Tensor:
    """The (B, T) attention mask of left-padded prompts ending at column PROMPT and right-padded
    responses starting there, the layout of every rollout batch."""
    T = PROMPT + max(response_lens)
    mask = torch.zeros(len(prompt_lens), T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        mask[i, PROMPT - p : PROMPT + r] = True
    return mask


def test_row_spans_are_each_rows_real_columns():
    mask = left_right_padded([3, 8, 1], [5, 0, 2])
    mask = torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=torch.bool)])  # an empty row
    assert row_spans(mask) == [(5, 13), (0, 8), (7, 10), (0, 0)]
    assert padded_size([(5, 13), (7, 10)]) == 2 * 8
    assert padded_size([(0, 0)]) == 0


def test_groups_cover_every_row_once_and_stay_within_the_budget():
    rng = random.Random(0)
    prompts = [rng.randint(1, PROMPT) for _ in range(64)]
    responses = [rng.randint(1, 200) for _ in range(64)]
    spans = row_spans(left_right_padded(prompts, responses))
    for budget in (50, 256, 1000, 10_000):
        groups = token_budget_groups(spans, budget)
        assert sorted(i for g in groups for i in g) == list(range(64))
        assert all(g == sorted(g) for g in groups)
        for g in groups:
            # Over budget only as a row of its own (one longer than the budget).
            assert padded_size([spans[i] for i in g]) <= budget or len(g) == 1, (budget, g)
        assert groups == token_budget_groups(spans, budget)  # deterministic


def test_long_rows_go_first_and_alone_when_over_the_budget():
    spans = row_spans(left_right_padded([2, 2, 2, 2], [3, 40, 5, 4]))
    groups = token_budget_groups(spans, budget=30)
    assert groups[0] == [1]  # 42 columns: over the budget, alone
    assert groups[1:] == [[0, 2, 3]]  # 3 rows x 7 columns = 21 <= 30


def test_spread_lengths_compute_far_less_padding_than_fixed_row_chunks():
    """The point of the budget: on lengths spread from 16 to 1024, fixed chunks of 8 rows (in
    arrival order) compute 1.8x the real tokens; groups by length under the same peak size 1.19x,
    in fewer passes (6 instead of 8); a smaller budget pads less still (1.06x at 2048)."""
    rng = random.Random(1)
    responses = [rng.randint(16, 1024) for _ in range(64)]
    spans = row_spans(left_right_padded([PROMPT] * 64, responses))
    real = sum(e - s for s, e in spans)
    fixed = sum(padded_size(spans[i : i + 8]) for i in range(0, 64, 8))
    budget = 8 * (PROMPT + 1024)  # the most a fixed chunk of 8 could take
    packed = sum(padded_size([spans[i] for i in g]) for g in token_budget_groups(spans, budget))
    assert fixed / real > 1.7
    assert packed / real < 1.25
    assert len(token_budget_groups(spans, budget)) < 8
    small = sum(padded_size([spans[i] for i in g]) for g in token_budget_groups(spans, 2048))
    assert small / real < 1.1


def test_a_non_positive_budget_is_refused():
    with pytest.raises(ValueError, match="must be positive"):
        token_budget_groups([(0, 3)], 0)


# --------------------------------------------------------------------------- packed rows

ARCHS = {
    # Hybrid sliding-window / global attention with sinks (eager), MoE.
    "mimo_v2_flash": lambda: tiny_mimo_config(sliding_window=8),
    "qwen3_moe": lambda: tiny_qwen3_moe_config(num_experts=4, max_position_embeddings=256),
    "llama": lambda: dict(
        model_type="llama",
        vocab_size=CHAR_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),  # fmt: skip
}


def test_packed_rows_round_trip_and_restart_positions():
    mask = left_right_padded([2, 3, 1], [1, 3, 0])
    ids = torch.arange(mask.numel()).view(mask.shape)
    packed = PackedRows(mask)
    assert packed.pack(ids).shape == (1, int(mask.sum()))
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0]]
    back = packed.unpack(packed.pack(ids))
    starts = torch.zeros_like(mask)
    for i, (s, _) in enumerate(row_spans(mask)):
        starts[i, s] = True
    assert torch.equal(back, torch.where(mask & ~starts, ids, 0))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_rows_give_the_padded_rows_log_probs(arch):
    """One packed row (no mask, positions restarting per row) through the model gives each row the
    log-probs it gets padded: no token sees another row. Rows longer than the sliding window
    check that windows restart too."""
    model = load_model(ModelConfig(config=ARCHS[arch](), tokenizer=BUILTIN_TOKENIZER), seed=0).eval()
    mask = left_right_padded([3, 8, 1, 5], [12, 2, 20, 7])
    g = torch.Generator().manual_seed(0)
    ids = torch.where(mask, torch.randint(3, CHAR_VOCAB_SIZE, mask.shape, generator=g), 0)
    with torch.no_grad():
        padded = token_logprobs(forward_logits(model, ids, mask).logits, ids)
        packed = PackedRows(mask)
        out = model(input_ids=packed.pack(ids), position_ids=packed.position_ids, use_cache=False)
        got = packed.unpack(token_logprobs(out.logits, packed.pack(ids)))
    starts = torch.tensor([s for s, _ in row_spans(mask)])
    scored = mask.clone()
    scored[torch.arange(len(starts)), starts] = False  # a row's first token has no context either way
    torch.testing.assert_close(got[scored], padded[scored], atol=2e-5, rtol=0)
    assert bool((got[~scored] == 0).all())


def test_packed_groups_count_real_tokens():
    spans = [(0, 10), (5, 8), (2, 9), (0, 4)]
    groups = token_budget_groups(spans, budget=14, packed=True)
    assert groups == [[0], [1, 2, 3]]  # longest first: 10 | 7 + 4 + 3 = 14
    assert token_budget_groups(spans, budget=13, packed=True) == [[0], [2, 3], [1]]  # 10 | 7 + 4 | 3
