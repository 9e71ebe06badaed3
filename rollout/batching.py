"""Pure tensor plumbing shared by the rollout backends and the pool: encode prompts, pack sampled
token lists into a ``RolloutBatch``, and merge the batches of several replicas into one.

No Ray, no model: everything here is tested directly (tests/test_rollout.py).

Layout (see mopd/types.py): prompt left-padded to P columns, response right-padded to R columns,
every response starts at column P; a stop token (any id of ``mopd.chat.stop_token_ids``: EOS,
end-of-turn, ...), when sampled, is the last response token and is part of ``response_mask`` (even
when it is also the pad id); nothing after it is. A multi-turn trajectory (``pack_rollout(...,
sampled=...)``) holds its turns and the tool results between them in its response region: only the
sampled tokens are in ``response_mask`` and carry rollout log-probs; the others are context.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mopd.chat import left_pad, prompts_ids
from mopd.types import PromptRow, RolloutBatch

if TYPE_CHECKING:
    from mopd.envs.base import TrajectoryStats


def encode_prompts(tokenizer, rows: Sequence[PromptRow]) -> list[list[int]]:
    """Token ids of each prompt as the student sees it (``mopd.chat.prompt_ids``: text with the
    tokenizer's special tokens, or chat messages through the chat template)."""
    return prompts_ids(tokenizer, rows)


def cut_at_stop(
    tokens: Sequence[int], logprobs: Sequence[float], stop_ids: Collection[int]
) -> tuple[list[int], list[float], bool]:
    """Tokens up to and including the first stop token (the rest, e.g. generate's padding, was never
    part of the response), their log-probs, and whether a stop token ended them (False: truncated)."""
    tokens = list(tokens)
    end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), None)
    stopped = end is not None
    end = len(tokens) if end is None else end
    return tokens[:end], [float(x) for x in logprobs[:end]], stopped


def pack_rollout(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    group_ids: Sequence[int],
    rows: Sequence[PromptRow],
    texts: Sequence[str],
    pad_id: int,
    policy_version: int,
    truncated: Sequence[bool] | None = None,
    sampled: Sequence[Sequence[bool]] | None = None,
    episodes: Sequence[TrajectoryStats | None] | None = None,
) -> RolloutBatch:
    """Build a RolloutBatch from per-trajectory token lists (one entry per trajectory, B in all).

    prompts[i]   prompt ids of trajectory i (BOS included)
    responses[i] ids after the prompt, already cut after the (last) stop token; logprobs[i] aligned
    truncated[i] whether response i ended without a stop token / was stopped by a limit (None: not known)
    sampled[i]   aligned with responses[i]: True where the student sampled the token, False on
                 context tokens (tool results, template glue: attended to, never trained, log-prob
                 0). None: every response token was sampled (a one-turn rollout)
    episodes[i]  trajectory i's environment stats (None: a one-turn row); None: no multi-turn rows
    """
    B = len(prompts)
    if not (len(responses) == len(logprobs) == len(group_ids) == len(rows) == len(texts) == B):
        raise ValueError("pack_rollout: every per-trajectory list must have the same length")
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    P = prompt_ids.shape[1]
    R = max((len(r) for r in responses), default=0)
    resp_ids = torch.full((B, R), pad_id, dtype=torch.int64)
    resp_mask = torch.zeros((B, R), dtype=torch.bool)
    resp_lp = torch.zeros((B, R), dtype=torch.float32)
    student = torch.zeros((B, R), dtype=torch.bool)
    if sampled is not None and len(sampled) != B:
        raise ValueError(f"pack_rollout: sampled has {len(sampled)} entries for {B} trajectories")
    for i, (r, lp) in enumerate(zip(responses, logprobs, strict=True)):
        if len(r) != len(lp):
            raise ValueError(f"trajectory {i}: {len(r)} tokens but {len(lp)} log-probs")
        resp_ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
        resp_mask[i, : len(r)] = True
        resp_lp[i, : len(r)] = torch.as_tensor(list(lp), dtype=torch.float32)
        if sampled is None:
            student[i, : len(r)] = True
        elif len(sampled[i]) != len(r):
            raise ValueError(f"trajectory {i}: {len(r)} tokens but {len(sampled[i])} sampled flags")
        else:
            student[i, : len(r)] = torch.as_tensor(list(sampled[i]), dtype=torch.bool)
    resp_lp = torch.where(student, resp_lp, 0.0)  # context tokens were not sampled: no rollout log-prob
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, resp_ids], 1),
        attention_mask=torch.cat([prompt_mask, resp_mask], 1),
        response_mask=torch.cat([torch.zeros_like(prompt_mask), student], 1),
        rollout_logprobs=torch.cat([torch.zeros((B, P), dtype=torch.float32), resp_lp], 1),
        group_ids=torch.as_tensor(list(group_ids), dtype=torch.int64).reshape(B),
        domains=[r.domain for r in rows],
        rows=list(rows),
        responses=list(texts),
        policy_version=policy_version,
        prompt_len=P,
        truncated=None if truncated is None else torch.as_tensor(list(truncated), dtype=torch.bool).reshape(B),
        episodes=None if episodes is None else list(episodes),
    )


def pack_samples(
    tokenizer,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[PromptRow],
    samples: Sequence[tuple[Sequence[int], Sequence[float]]],
    n: int,
    policy_version: int,
    stop_ids: Collection[int],
) -> RolloutBatch:
    """The RolloutBatch of n samples of each prompt, as a rollout backend returns it.

    samples[i*n + k] is (sampled ids, their log-probs) of sample k of prompts[i]: cut after the
    first stop token (``stop_ids``) here, decoded for ``responses``; trajectory i*n + k gets group
    id i. A sample without a stop token is marked truncated."""
    cut = [cut_at_stop(tokens, lps, stop_ids) for tokens, lps in samples]
    responses = [c[0] for c in cut]
    return pack_rollout(
        prompts=[p for p in prompts for _ in range(n)],
        responses=responses,
        logprobs=[c[1] for c in cut],
        group_ids=[i for i in range(len(rows)) for _ in range(n)],
        rows=[r for r in rows for _ in range(n)],
        texts=decode_responses(tokenizer, responses),
        pad_id=tokenizer.pad_token_id,
        policy_version=policy_version,
        truncated=[not c[2] for c in cut],
    )


def repad(t: torch.Tensor, P: int, new_P: int, new_R: int, fill) -> torch.Tensor:
    """Move a (B, P + R, ...) tensor to (B, new_P + new_R, ...): the prompt part right-aligned at
    column new_P, the response part starting at new_P; new cells hold ``fill``."""
    B, T = t.shape[:2]
    R = T - P
    if new_P < P or new_R < R:
        raise ValueError(f"repad can only grow: ({P}, {R}) -> ({new_P}, {new_R})")
    out = torch.full((B, new_P + new_R, *t.shape[2:]), fill, dtype=t.dtype)
    out[:, new_P - P : new_P] = t[:, :P]
    out[:, new_P : new_P + R] = t[:, P:]
    return out


def merge_batches(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """Concatenate replica batches in order into one batch with a common P and R.

    Group ids are offset so the groups of different batches stay distinct (each batch's ids are
    assumed to start at 0, as a rollout actor numbers the prompts of one call)."""
    if not batches:
        raise ValueError("merge_batches: nothing to merge")
    versions = {b.policy_version for b in batches}
    if len(versions) != 1:
        raise ValueError(f"merge_batches: batches come from different policy versions {sorted(versions)}")
    has_routes = [b.routed_experts is not None for b in batches]
    if any(has_routes) and not all(has_routes):
        raise ValueError("merge_batches: routed_experts present in some batches only")
    known_truncation = all(b.truncated is not None for b in batches)
    P = max(b.prompt_len for b in batches)
    R = max(b.input_ids.shape[1] - b.prompt_len for b in batches)

    def cat(name: str, fill) -> torch.Tensor:
        return torch.cat([repad(getattr(b, name), b.prompt_len, P, R, fill) for b in batches])

    offsets = np.cumsum([0] + [int(b.group_ids.max()) + 1 if len(b) else 0 for b in batches[:-1]])
    return RolloutBatch(
        input_ids=cat("input_ids", pad_id),
        attention_mask=cat("attention_mask", False),
        response_mask=cat("response_mask", False),
        rollout_logprobs=cat("rollout_logprobs", 0.0),
        group_ids=torch.cat([b.group_ids + int(o) for b, o in zip(batches, offsets, strict=True)]),
        domains=[d for b in batches for d in b.domains],
        rows=[r for b in batches for r in b.rows],
        responses=[s for b in batches for s in b.responses],
        policy_version=versions.pop(),
        prompt_len=P,
        routed_experts=cat("routed_experts", -1) if all(has_routes) else None,  # -1: route afresh
        truncated=torch.cat([b.truncated for b in batches if b.truncated is not None]) if known_truncation else None,
        episodes=_merged_episodes(batches),
    )


def _merged_episodes(batches: Sequence[RolloutBatch]) -> list[TrajectoryStats | None] | None:
    """The batches' episode stats in order (None for the rows of one-turn batches), or None when
    no batch has any."""
    if all(b.episodes is None for b in batches):
        return None
    return [e for b in batches for e in (b.episodes if b.episodes is not None else [None] * len(b))]


def decode_responses(tokenizer, responses: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(r), skip_special_tokens=True) for r in responses]
