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

Code writing (generator ``code_exec``, domain ``code``): the prompt names a value and the response
is any Python expression that prints as it; the verifier *executes* the response in the sandbox
(``mopd.sandbox``) and compares what it prints. The SFT target is the expression drawn above:

    make ababab:       -> 'ab'*3      ('ab'+'ab'+'ab' also scores 1)
"""

from __future__ import annotations

import logging
import random
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from mopd.domains import register_generator
from mopd.domains.common import exact_match, register_levels, sample_split
from mopd.types import PromptRow

log = logging.getLogger(__name__)

DOMAIN = "code"
LETTERS = string.ascii_lowercase
DEFAULT_LEVEL = 2
MAX_ANSWER = 12  # characters; keeps responses short for a character-level student

# The helper functions a prompt may call, so a test can evaluate prompts as Python.
HELPERS: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "upper": str.upper,
    "sort": lambda s: "".join(sorted(s)),
}


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _call(rng: random.Random, fn: str) -> tuple[str, str]:
    s = _word(rng, 2, 5)
    return f"{fn}('{s}')", HELPERS[fn](s)


def _repeat(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, 1, 4)
    k = rng.randint(2, min(4, MAX_ANSWER // len(s)))
    return f"'{s}'*{k}", s * k


def _concat(rng: random.Random) -> tuple[str, str]:
    s, t = _word(rng, 1, 5), _word(rng, 1, 5)
    return f"'{s}'+'{t}'", s + t


def _length(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, 1, 9)
    return f"len('{s}')", str(len(s))


def _index(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, 2, 6)
    i = rng.randrange(len(s))
    return f"'{s}'[{i}]", s[i]


def _slice(rng: random.Random) -> tuple[str, str]:
    s = _word(rng, 3, 7)
    i = rng.randrange(len(s))
    j = rng.randint(i + 1, len(s))
    return f"'{s}'[{i}:{j}]", s[i:j]


# kind -> (level it first appears at, draw of (expression, value)).
OPS: dict[str, tuple[int, Callable[[random.Random], tuple[str, str]]]] = {
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


def draw(rng: random.Random, level: int = DEFAULT_LEVEL) -> tuple[str, str, str]:
    """One (prompt, answer, operation) at ``level``."""
    kinds = [k for k, (lvl, _) in OPS.items() if lvl <= level]
    kind = rng.choice(kinds)
    expr, value = OPS[kind][1](rng)
    return f"{expr}=", value, kind


def generate(rng: random.Random, n: int, split: str, level: int = DEFAULT_LEVEL) -> list[PromptRow]:
    """``n`` code prompts of ``split`` ("train" or "eval"), drawn with ``rng``."""
    if level not in LEVELS:
        raise ValueError(f"code: unknown level {level}; valid: {', '.join(map(str, LEVELS))}")
    return sample_split(rng, n, split, DOMAIN, lambda r: draw(r, level))


# ---------------------------------------------------------------------- code writing (executed)

EXEC_LEVEL = 3
# The helpers as source, defined in the sandbox before the response runs.
HELPERS_SRC = "rev = lambda s: s[::-1]\nupper = str.upper\nsort = lambda s: ''.join(sorted(s))\n"
# Per-response limits: the answer is one short expression, so anything slow or big is wrong anyway.
EXEC_LIMITS: dict[str, Any] = dict(cpu_s=1.0, wall_s=3.0, memory_mb=256, max_procs=8, max_file_mb=1, disk_mb=4)
# How executed responses ended, by sandbox reason ("ok", "timeout", "cpu", "exit 1", "error: ...").
EXEC_OUTCOMES: Counter = Counter()


def draw_exec(rng: random.Random, level: int = EXEC_LEVEL) -> tuple[str, str, str]:
    """One (prompt, value, operation) of the writing task; the SFT expression goes in meta."""
    prompt, value, kind = draw(rng, level)
    return f"make {value}:", value, kind


def generate_exec(rng: random.Random, n: int, split: str) -> list[PromptRow]:
    """``n`` code-writing prompts; ``meta["answer"]`` is an expression, ``meta["value"]`` what it
    must print, ``meta["check"] == "exec"`` routes the row to the executing verifier."""
    rows = sample_split(rng, n, split, DOMAIN, draw_exec)
    for row in rows:
        value = row.meta["answer"]
        row.meta.update(answer=_expression_for(value, row.meta["kind"]), value=value, check="exec")
    return rows


def _expression_for(value: str, kind: str) -> str:
    """A shortest-form expression that prints ``value`` (the SFT target)."""
    if kind == "repeat":
        for k in (4, 3, 2):
            if len(value) % k == 0 and value[: len(value) // k] * k == value:
                return f"'{value[: len(value) // k]}'*{k}"
    if kind == "upper":
        return f"upper('{value.lower()}')"
    if kind == "rev" and len(value) > 1:
        return f"rev('{value[::-1]}')"
    return repr(value) if not value.isdigit() else value


def program_for(response: str) -> str:
    """The Python run for a response: the helpers, then print the response's value."""
    return f"{HELPERS_SRC}print((\n{response}\n))\n"


def exec_match(row: PromptRow, response: str) -> float:
    """1.0 iff running the response in the sandbox prints ``meta["value"]``; anything else (an
    error, a timeout, a limit hit, an attack that was refused, a sandbox failure) scores 0.0."""
    from mopd.sandbox import run_untrusted

    try:
        res = run_untrusted(program_for(response), **EXEC_LIMITS)
    except Exception as e:  # never let one response stop the run
        log.warning("code_exec: sandbox failed on %r: %s", response[:80], e)
        EXEC_OUTCOMES[f"error: {type(e).__name__}"] += 1
        return 0.0
    EXEC_OUTCOMES[res.reason] += 1
    return 1.0 if res.ok and res.stdout.rstrip("\n") == str(row.meta["value"]) else 0.0


def executes(row: PromptRow) -> bool:
    """Whether ``verify`` runs the response for this row (in the sandbox)."""
    return row.meta.get("check") == "exec"


def verify(row: PromptRow, response: str) -> float:
    """The code domain's verifier: executed for code-writing rows, exact match otherwise."""
    if executes(row):
        return exec_match(row, response)
    return exact_match(row, response)


register_levels(DOMAIN, generate, LEVELS, DEFAULT_LEVEL, verify=verify, executes=executes)
register_generator("code_exec", generate_exec)  # its rows are domain "code": the code verifier runs them
