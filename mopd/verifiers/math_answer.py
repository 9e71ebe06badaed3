"""The ``math_answer`` verifier: a response's final answer against ``row.meta["answer"]``, compared
by mathematical equivalence (``math_verify``: ``\\frac{1}{2}`` = ``0.5`` = ``1/2``, ``1,000`` =
``1000``, ``5 \\text{ cm}`` = ``5``, intervals, sets, ``x = 3`` = ``3``).

    from mopd.verifiers.math_answer import final_answer, math_answer
    final_answer("so 6 x 7 = 42.\\n#### 42")             # "42"
    math_answer(PromptRow("...", "math", meta={"answer": "\\\\boxed{\\\\frac12}"}), "... \\\\boxed{0.5}")  # 1.0

The response's final answer is, in this order of preference: the content of the last complete
``\\boxed{...}`` (or ``\\fbox{...}``; nested braces kept), the rest of the line after the last
``####``, the rest of the line after the last "the answer is" / "answer:" (any case, up to the end
of that sentence), else the last number of the text. The gold answer is the content of its last
``\\boxed{}`` (MATH solutions), else the text after its last ``####`` (GSM8K), else all of it.

Timeouts: math_verify bounds parsing and comparison with ``signal.alarm``, which only works in the
main thread of a process. There (a plain call, or a worker of ``mopd.verifiers.VerifierPool``'s
process pool) each step gets ``TIMEOUT_S``; in any other thread it runs without a timeout, so
answers that could make sympy compute without end (power towers, huge exponents and factorials:
``_RISKY``) score 0.0 unparsed, and math_verify's warning that its timeouts are off is dropped.
Answers longer than ``MAX_ANSWER_CHARS`` are compared as text only, in any thread.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mopd.types import PromptRow

log = logging.getLogger(__name__)

# Seconds math_verify may spend parsing one answer, and comparing one pair (main thread only). Wall
# time: at 5 s a right answer (`\boxed{x = 3}` vs 3, 0.08 s when idle) timed out and scored 0.0 on
# a 2-core machine running the test suite beside two training runs; a hang is what this guards.
TIMEOUT_S = 20
# Answers longer than this (characters) are compared as text only: no sane final answer is, and a
# long one is where a parse without a timeout could take forever.
MAX_ANSWER_CHARS = 400
# Whether this process has parsed once (untimed, a trivial answer) to build math_verify's grammar.
_WARM = False
# How comparisons ended: "equal", "unequal", "no_answer", "skipped_risky", "error: <type>".
OUTCOMES: Counter = Counter()


class _TimeoutsOffOnPurpose(logging.Filter):
    """Drops math_verify's "Timeout is disabled ..." warning: off in threads is our choice (above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_TimeoutsOffOnPurpose())

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = "####"
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is|answer\s*:", re.IGNORECASE)
# A number: thousands groups (1,234,567.5), or digits with an optional decimal part or /denominator.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
# A sentence ends at a period followed by a space or the end (not a decimal point: 3.5).
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
# A number followed by plain words ("18 dollars", "5 apples"): the words are a unit.
_NUMBER_AND_WORDS = re.compile(rf"^({_NUMBER.pattern})\s+[A-Za-z][A-Za-z\s.]*$")
# What sympy may evaluate without end: a power tower (a^{b^c}, a^b^c), an exponent of 6+ digits,
# a factorial of 3+ digits or of an expression.
_RISKY = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\w+\s*\^|\^\s*\{?\s*\d{6,}|(?:\d{3,}|[)}])\s*!")


def _balanced(text: str, start: int) -> str | None:
    """The text from ``start`` (just after an opening ``{``) to its matching ``}``; None if unclosed.
    Escaped braces (``\\{``, ``\\}``: set braces) do not count."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` of ``text``, or None."""
    for m in reversed(list(_BOXED.finditer(text))):
        content = _balanced(text, m.end())
        if content is not None:
            return content
    return None


def _rest_of_line(text: str) -> str:
    text = text.lstrip(" \t:*\r\n")
    return text.split("\n", 1)[0]


def _clean(answer: str) -> str:
    """Strip what surrounds an answer in prose: spaces, ``$``/``\\(``/``\\[`` delimiters, markdown
    bold, a closing period; a number followed by words keeps the number."""
    answer = answer.strip().strip("*").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : -len(right)].strip()
    answer = answer.rstrip(".").strip().strip("$").strip()
    unit = _NUMBER_AND_WORDS.match(answer)
    return unit.group(1) if unit else answer


def final_answer(text: str) -> str | None:
    """The final answer of a response (module docstring for the rules), cleaned; None if it has none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed) or None
    if _HASHES in text:
        return _clean(_rest_of_line(text.rsplit(_HASHES, 1)[1])) or None
    said = list(_ANSWER_IS.finditer(text))
    if said:
        rest = _rest_of_line(text[said[-1].end() :])
        answer = _clean(_SENTENCE_END.split(rest, maxsplit=1)[0])
        if answer:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(" ", "") if numbers else None


def gold_answer(answer: Any) -> str:
    """The gold answer of ``row.meta["answer"]``: its last ``\\boxed{}``, else after its last
    ``####``, else all of it (a number is taken as its text)."""
    text = str(answer)
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    if _HASHES in text:
        return _clean(_rest_of_line(text.rsplit(_HASHES, 1)[1]))
    return _clean(text)


def _same_text(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def _timeouts() -> int | None:
    """math_verify's timeout here: ``TIMEOUT_S`` in a main thread (signals work), else None."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def equivalent(gold: str, pred: str) -> bool:
    """Whether ``pred`` is mathematically equal to ``gold`` (both bare answers, as ``final_answer``
    returns them). Never raises: what math_verify cannot read or compare is unequal."""
    if _same_text(gold, pred):
        return True
    timeout = _timeouts()
    if max(len(gold), len(pred)) > MAX_ANSWER_CHARS:
        return False
    if timeout is None and (_RISKY.search(gold) or _RISKY.search(pred)):
        OUTCOMES["skipped_risky"] += 1
        return False
    from math_verify import parse, verify  # type: ignore[import-untyped]  # sympy loads on first use

    global _WARM
    if not _WARM:  # builds the LaTeX grammar, which took more than TIMEOUT_S on a loaded machine
        parse("\\boxed{1}", parsing_timeout=None)
        _WARM = True
    try:
        g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
        p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
        return bool(g and p and verify(g, p, timeout_seconds=timeout))
    except Exception as e:  # math_verify catches its own errors; anything else is still just unequal
        log.warning("math_answer: cannot compare %r with %r: %s: %s", gold[:80], pred[:80], type(e).__name__, e)
        OUTCOMES[f"error: {type(e).__name__}"] += 1
        return False


def _where(row: PromptRow) -> str:
    return f"{row.domain} prompt {row.prompt[:80]!r} (source {row.source or '?'}, row {row.index})"


def answers(row: PromptRow, response: str) -> tuple[str, str | None]:
    """(gold, response's final answer or None): the cheap half of ``math_answer``, regular
    expressions only (``VerifierPool`` runs it on the caller and ``equivalent`` in a process)."""
    if "answer" not in row.meta:
        raise KeyError(f"{_where(row)} has no 'answer' in its meta; give the math_answer rows an 'answer' field")
    return gold_answer(row.meta["answer"]), final_answer(response)


def reward(same: bool | None) -> float:
    """The reward of a comparison (None: the response had no final answer), counted in ``OUTCOMES``."""
    OUTCOMES["no_answer" if same is None else "equal" if same else "unequal"] += 1
    return 1.0 if same else 0.0


def math_answer(row: PromptRow, response: str) -> float:
    """1.0 iff the response's final answer equals ``row.meta["answer"]`` mathematically; a response
    without a final answer scores 0.0. A row without ``answer`` raises ``KeyError``."""
    gold, pred = answers(row, response)
    return reward(None if pred is None else equivalent(gold, pred))
