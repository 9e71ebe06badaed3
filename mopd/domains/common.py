"""What the built-in synthetic domains share: the train/eval partition, the sampler, the verifier.

Every built-in prompt has exactly one right answer (``row.meta["answer"]``), which is both the SFT
target and what the verifier compares against. The split of a prompt is a pure function of its
text (a hash), so a prompt never lands in both splits, whatever seed or sample size is used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from mopd.types import PromptRow

SPLITS = ("train", "eval")
# Share of every domain's prompt space held out for eval, in percent.
EVAL_PERCENT = 10

# draw(rng) -> (prompt, answer, kind); kind names the sub-task (e.g. the operator) for analysis.
Draw = Callable[[random.Random], tuple[str, str, str]]


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a stable hash (not Python's salted ``hash``) of its text."""
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") % 100 < EVAL_PERCENT else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def sample_split(rng: random.Random, n: int, split: str, domain: str, draw: Draw) -> list[PromptRow]:
    """``n`` rows of ``split``, drawn with ``draw`` and kept if the prompt hashes into ``split``.

    Prompts are distinct while the split has fresh ones to offer; once a long run of draws finds
    only repeats (a space smaller than ``n``) repeats are allowed, so any ``n`` terminates.
    """
    check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows: list[PromptRow] = []
    seen: set = set()
    repeat_budget = 20 * n + 1000
    misses = 0
    while len(rows) < n:
        prompt, answer, kind = draw(rng)
        if split_of(prompt) != split:
            misses += 1
            if misses > 1000 * (n + 10):  # a draw that never reaches this split: a bug, not bad luck
                raise RuntimeError(f"{domain}: cannot find prompts of split {split!r}")
            continue
        if prompt in seen and repeat_budget > 0:
            repeat_budget -= 1
            continue
        seen.add(prompt)
        meta = {"answer": answer, "kind": kind}
        rows.append(PromptRow(prompt=prompt, domain=domain, meta=meta, source=f"generator:{domain}", index=len(rows)))
    return rows


def exact_match(row: PromptRow, response: str) -> float:
    """1.0 iff the response is exactly the answer once surrounding whitespace is stripped."""
    if "answer" not in row.meta:
        raise KeyError(
            f"{row.domain} prompt {row.prompt!r} (source {row.source or '?'}, row {row.index}) has no "
            "'answer' in its meta; give file rows an 'answer' field"
        )
    return 1.0 if response.strip() == str(row.meta["answer"]) else 0.0


def register_levels(
    name: str,
    generate: Callable[..., list[PromptRow]],
    levels: tuple[int, ...],
    default: int,
    verify: Callable[[PromptRow, str], float] = exact_match,
    executes: Callable[[PromptRow], bool] | None = None,
) -> None:
    """Register the domain ``name`` (its verifier, and its generator at the default level) and a
    generator ``name_l<k>`` for every level k.

    A recipe picks a difficulty with the generator name alone (``generator: math_l3``) while the
    source's ``domain`` stays ``math``, whose verifier (exact match by default) scores every level.
    """
    from functools import partial

    from mopd.domains import register_domain, register_generator

    register_domain(name, partial(generate, level=default), verify, executes)
    for level in levels:
        register_generator(f"{name}_l{level}", partial(generate, level=level))
