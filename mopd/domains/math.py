"""Synthetic arithmetic: ``"12+7="`` -> ``"19"``.

Operands are whole numbers written in decimal; every result is non-negative (``a-b`` has
``a >= b``: negative results were much harder for tiny teachers). Levels add operators:

    level 0   a+b, a-b       a in 10..99, b in 0..9, no carry or borrow: the tens digit is copied and
                             the ones digit is a single-digit fact (for the 2-core quickstart)
    level 1   a+b            a, b in 0..99
    level 2   a+b, a-b       (default)
    level 3   a+b, a-b, a*b  b in 0..9 for a*b, so the table of single digits is all it needs

Answers are 1-4 digits, no sign, no leading zeros.
"""

from __future__ import annotations

import random

from mopd.domains.common import register_levels, sample_split
from mopd.types import PromptRow

DOMAIN = "math"
MAX_OPERAND = 99
MAX_FACTOR = 9  # second operand of a*b; larger factors need multi-digit partial products
LEVEL_OPS = {0: "+-", 1: "+", 2: "+-", 3: "+-*"}
DEFAULT_LEVEL = 2


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def draw(rng: random.Random, level: int = DEFAULT_LEVEL) -> tuple[str, str, str]:
    """One (prompt, answer, operator) at ``level``."""
    op = rng.choice(LEVEL_OPS[level])
    if level == 0:
        return _draw_no_carry(rng, op)
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, MAX_FACTOR if op == "*" else MAX_OPERAND)
    if op == "-" and a < b:
        a, b = b, a  # keep the result non-negative; the pair stays uniform over a >= b
    return f"{a}{op}{b}=", str(_apply(op, a, b)), op


def _draw_no_carry(rng: random.Random, op: str) -> tuple[str, str, str]:
    a = rng.randint(10, MAX_OPERAND)
    ones = a % 10
    b = rng.randint(0, 9 - ones) if op == "+" else rng.randint(0, ones)
    return f"{a}{op}{b}=", str(_apply(op, a, b)), op


def generate(rng: random.Random, n: int, split: str, level: int = DEFAULT_LEVEL) -> list[PromptRow]:
    """``n`` arithmetic prompts of ``split`` ("train" or "eval"), drawn with ``rng``."""
    if level not in LEVEL_OPS:
        raise ValueError(f"math: unknown level {level}; valid: {', '.join(map(str, LEVEL_OPS))}")
    return sample_split(rng, n, split, DOMAIN, lambda r: draw(r, level))


register_levels(DOMAIN, generate, tuple(LEVEL_OPS), DEFAULT_LEVEL)
