"""Synthetic code reading: predict what a one-line string expression evaluates to.

    upper('abc')=      -> ABC        level 0 (copying, position by position)
    'ab'+'cde'=        -> abcde      level 0
    'ab'*3=            -> ababab     level 1
    rev('abc')=        -> cba        level 2 (default)
    len('abcde')=      -> 5          level 2
    'abcde'[2]=        -> c          level 2
    sort('dbca')=      -> abcd       level 3
    'abcdef'[1:4]=     -> bcd        level 3

Strings are lowercase ASCII letters; ``rev``, ``upper`` and ``sort`` return strings (``sort``
is ``''.join(sorted(s))``); everything else is Python. The answer is the value printed without
quotes. Each level includes the operations of the levels below it.
"""

from __future__ import annotations

import random
import string
from typing import Callable, Dict, List, Tuple

from mopd.types import PromptRow
from teachers.domains.common import register_levels, sample_split

DOMAIN = "code"
LETTERS = string.ascii_lowercase
DEFAULT_LEVEL = 2
MAX_ANSWER = 12  # characters; keeps responses short for a character-level student

# The helper functions a prompt may call, so a test can evaluate prompts as Python.
HELPERS: Dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "upper": str.upper,
    "sort": lambda s: "".join(sorted(s)),
}


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _call(rng: random.Random, fn: str) -> Tuple[str, str]:
    s = _word(rng, 2, 5)
    return f"{fn}('{s}')", HELPERS[fn](s)


def _repeat(rng: random.Random) -> Tuple[str, str]:
    s = _word(rng, 1, 4)
    k = rng.randint(2, min(4, MAX_ANSWER // len(s)))
    return f"'{s}'*{k}", s * k


def _concat(rng: random.Random) -> Tuple[str, str]:
    s, t = _word(rng, 1, 5), _word(rng, 1, 5)
    return f"'{s}'+'{t}'", s + t


def _length(rng: random.Random) -> Tuple[str, str]:
    s = _word(rng, 1, 9)
    return f"len('{s}')", str(len(s))


def _index(rng: random.Random) -> Tuple[str, str]:
    s = _word(rng, 2, 6)
    i = rng.randrange(len(s))
    return f"'{s}'[{i}]", s[i]


def _slice(rng: random.Random) -> Tuple[str, str]:
    s = _word(rng, 3, 7)
    i = rng.randrange(len(s))
    j = rng.randint(i + 1, len(s))
    return f"'{s}'[{i}:{j}]", s[i:j]


# kind -> (level it first appears at, draw of (expression, value)).
OPS: Dict[str, Tuple[int, Callable[[random.Random], Tuple[str, str]]]] = {
    "upper": (0, lambda r: _call(r, "upper")),
    "repeat": (1, _repeat),
    "concat": (0, _concat),
    "rev": (2, lambda r: _call(r, "rev")),
    "len": (2, _length),
    "index": (2, _index),
    "sort": (3, lambda r: _call(r, "sort")),
    "slice": (3, _slice),
}
LEVELS = (0, 1, 2, 3)


def draw(rng: random.Random, level: int = DEFAULT_LEVEL) -> Tuple[str, str, str]:
    """One (prompt, answer, operation) at ``level``."""
    kinds = [k for k, (lvl, _) in OPS.items() if lvl <= level]
    kind = rng.choice(kinds)
    expr, value = OPS[kind][1](rng)
    return f"{expr}=", value, kind


def generate(rng: random.Random, n: int, split: str, level: int = DEFAULT_LEVEL) -> List[PromptRow]:
    """``n`` code prompts of ``split`` ("train" or "eval"), drawn with ``rng``."""
    if level not in LEVELS:
        raise ValueError(f"code: unknown level {level}; valid: {', '.join(map(str, LEVELS))}")
    return sample_split(rng, n, split, DOMAIN, lambda r: draw(r, level))


register_levels(DOMAIN, generate, LEVELS, DEFAULT_LEVEL)
