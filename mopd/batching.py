"""Forward passes by tokens instead of rows: rows grouped by length under a token budget.

A batch is padded to its longest row (prompts left-padded, responses right-padded), so a pass over
``b`` rows computes ``b x span`` positions, ``span`` being the columns from the earliest prompt
start to the latest response end among them. With response lengths spread from tens to thousands
of tokens, fixed row counts spend most of that on padding. ``token_budget_groups`` sorts the rows
by length and cuts them into groups whose padded size stays within a budget, so short rows travel
together in big groups and long ones in small groups. Used by the trainer's micro-batches
(``trainer.max_tokens_per_micro_batch``) and the HF teacher's scoring passes
(``teachers.<d>.max_tokens_per_batch``).

    spans = row_spans(attention_mask)                       # [(start, end)] per row
    for rows in token_budget_groups(spans, budget=8192):    # lists of row indices
        ...forward attention_mask[rows] trimmed to its real columns...
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch


def row_spans(attention_mask: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each row's real tokens in a (B, T) mask: the first real column and one
    past the last; ``(0, 0)`` for a row with none."""
    mask = attention_mask.bool()
    T = mask.shape[1]
    any_real = mask.any(1)
    start = mask.int().argmax(1)
    end = T - mask.flip(1).int().argmax(1)
    return [(int(s), int(e)) if a else (0, 0) for s, e, a in zip(start, end, any_real, strict=True)]


def padded_size(spans: Sequence[tuple[int, int]]) -> int:
    """Positions a pass over these rows computes: rows x the columns spanning all their tokens."""
    real = [(s, e) for s, e in spans if e > s]
    if not real:
        return 0
    return len(spans) * (max(e for _, e in real) - min(s for s, _ in real))


def longest_first(spans: Sequence[tuple[int, int]]) -> list[int]:
    """Row indices by length, longest first, ties by index (a deterministic order)."""
    return sorted(range(len(spans)), key=lambda i: (-(spans[i][1] - spans[i][0]), i))


def token_budget_groups(spans: Sequence[tuple[int, int]], budget: int, packed: bool = False) -> list[list[int]]:
    """Indices of the rows in groups whose ``padded_size`` is at most ``budget``, longest rows first;
    with ``packed``, whose real tokens are (rows laid end to end, ``PackedRows``).

    Rows are sorted by length (ties by index, so the grouping is deterministic) and added to the
    current group while it stays within the budget; a row longer than the budget forms a group of
    its own. Each group's indices are in ascending order. Empty rows cost nothing and join the
    current group."""
    if budget <= 0:
        raise ValueError(f"the token budget must be positive, got {budget}")
    order = longest_first(spans)
    if packed:
        return _packed_groups([(i, spans[i][1] - spans[i][0]) for i in order], budget)
    groups: list[list[int]] = []
    current: list[int] = []
    lo, hi = _NO_COLUMNS  # the current group's column span
    for i in order:
        s, e = spans[i] if spans[i][1] > spans[i][0] else _NO_COLUMNS
        new_lo, new_hi = min(lo, s), max(hi, e)
        if current and (len(current) + 1) * max(new_hi - new_lo, 0) > budget:
            groups.append(sorted(current))
            current, (new_lo, new_hi) = [], (s, e)
        lo, hi = new_lo, new_hi
        current.append(i)
    if current:
        groups.append(sorted(current))
    return groups


# The span of no columns: min/max with it leave a real span unchanged; its width counts as 0.
_NO_COLUMNS = (sys.maxsize, -1)


def _packed_groups(lengths: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """(index, length) pairs, longest first, cut into groups of at most ``budget`` tokens in all."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in lengths:
        if current and total + n > budget:
            groups.append(sorted(current))
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        groups.append(sorted(current))
    return groups


class PackedRows:
    """The real tokens of (b, t) padded rows laid end to end in one row of ``n`` tokens, and back.

    The model sees one sequence per row with its position ids restarting at 0 and no attention
    mask: transformers then builds a block-diagonal causal mask from the position ids (SDPA and
    eager attention) or runs varlen flash-attention, so no token attends across rows and none is
    padding. A row's first position is the only one whose next-token prediction crosses into the
    next row; its log-prob (that of the row's first token, a prompt token) is 0, as column 0 is in
    the padded layout.

        packed = PackedRows(attention_mask)
        out = model(input_ids=packed.pack(input_ids), position_ids=packed.position_ids)
        logp = packed.unpack(per_token_logprobs)         # (b, t), 0 at padding
    """

    def __init__(self, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        self.shape = tuple(mask.shape)
        self.index = mask.flatten().nonzero().flatten()  # rows' real tokens, row by row
        positions = mask.long().cumsum(-1) - 1
        self.position_ids = positions.flatten()[self.index][None]
        self.starts = self.position_ids[0] == 0  # (n,) a row's first token

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(b, t, ...) -> (1, n, ...): the real tokens' entries, row by row."""
        return x.flatten(0, 1)[self.index][None]

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        """(1, n, ...) -> (b, t, ...): entries back at their rows' columns, 0 at padding and at
        each row's first token. Differentiable."""
        y = y[0].masked_fill(self.starts.view(-1, *([1] * (y.dim() - 2))), 0)
        full = y.new_zeros(self.shape[0] * self.shape[1], *y.shape[1:])
        return full.index_copy(0, self.index, y).view(*self.shape, *y.shape[1:])
