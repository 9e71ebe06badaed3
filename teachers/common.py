"""Helpers shared by the teacher backends: input checks, row chunks, padding trims. Pure functions
on tensors; no Ray, no vLLM (vocabulary signatures are in ``mopd.vocab``).

Tensor layout (see ``mopd.types``): a batch of B rows and T columns, prompts left-padded, responses
right-padded; position t of every (B, T) tensor refers to token ``input_ids[:, t]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from mopd.types import TeacherScores


def check_score_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, topk: int
) -> None:
    """Shapes and dtypes of a ``score`` call: (B, T) int64 / bool / bool, topk >= 0."""
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise TypeError(f"input_ids must be (B, T) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
    for name, m in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if m.shape != input_ids.shape or m.dtype != torch.bool:
            raise TypeError(f"{name} must be {tuple(input_ids.shape)} bool, got {tuple(m.shape)} {m.dtype}")
    if bool((response_mask & ~attention_mask).any()):
        raise ValueError("response_mask marks tokens that attention_mask excludes")
    if topk < 0:
        raise ValueError(f"topk must be >= 0, got {topk}")


def row_chunks(num_rows: int, batch_size: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``batch_size`` rows."""
    for start in range(0, num_rows, batch_size):
        yield slice(start, min(start + batch_size, num_rows))


def active_columns(attention_mask: torch.Tensor) -> slice | None:
    """The columns of a (b, T) chunk that hold at least one real token, or None if none do.

    Columns that are padding in every row change nothing for the rows' real tokens (they are masked
    and positions ignore them), so dropping them is free speed: the left padding of the longest
    prompt and the right padding of the longest response."""
    used = attention_mask.any(0).nonzero().flatten()
    if used.numel() == 0:
        return None
    return slice(int(used[0]), int(used[-1]) + 1)


def row_span(attention_mask_row: torch.Tensor) -> tuple[int, int] | None:
    """(start, end) columns of one row's real tokens, or None for an empty row.

    Raises if the real tokens are not contiguous (a hole would be silently scored as a token)."""
    idx = attention_mask_row.nonzero().flatten()
    if idx.numel() == 0:
        return None
    start, end = int(idx[0]), int(idx[-1]) + 1
    if end - start != idx.numel():
        raise ValueError(
            f"attention_mask has a hole between columns {start} and {end}: expected left/right padding only"
        )
    return start, end


def rows_to_score(attention_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[list[int], list[tuple[int, int]]]:
    """Rows with a response token after at least one context token, and their (start, end) spans of
    real tokens: what a backend that takes each row unpadded (an engine, a server) sends."""
    rows, spans = [], []
    for i in range(attention_mask.shape[0]):
        span = row_span(attention_mask[i])
        if span is not None and span[1] - span[0] >= 2 and bool(response_mask[i, span[0] + 1 : span[1]].any()):
            rows.append(i)
            spans.append(span)
    return rows, spans


def put_row_scores(
    out: TeacherScores,
    row: int,
    cols: slice,
    keep: torch.Tensor,
    logprobs: torch.Tensor,
    top: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Write one row's scores of columns ``cols`` (log-probs (n,), optional top-k ids and log-probs
    (n, k)) into ``out``, 0 where ``keep`` (the row's response mask there) is False."""
    out.logprobs[row, cols] = torch.where(keep, logprobs, 0.0)
    if top is not None:
        assert out.topk_ids is not None and out.topk_logprobs is not None  # empty_scores(topk > 0)
        out.topk_ids[row, cols] = torch.where(keep[:, None], top[0], 0)
        out.topk_logprobs[row, cols] = torch.where(keep[:, None], top[1], 0.0)


def empty_scores(num_rows: int, num_cols: int, topk: int) -> TeacherScores:
    """All-zero scores: (B, T) log-probs and, with ``topk`` > 0, (B, T, topk) ids and log-probs."""
    logprobs = torch.zeros(num_rows, num_cols, dtype=torch.float32)
    if topk <= 0:
        return TeacherScores(logprobs=logprobs)
    return TeacherScores(
        logprobs=logprobs,
        topk_ids=torch.zeros(num_rows, num_cols, topk, dtype=torch.int64),
        topk_logprobs=torch.zeros(num_rows, num_cols, topk, dtype=torch.float32),
    )
