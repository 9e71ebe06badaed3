"""The ``tool_call`` verifier: the tool calls of a response against ``row.meta["calls"]``, compared
as data.

    row = PromptRow("Weather in Paris?", "agent", meta={"calls": [{"name": "weather", "arguments": {"city": "Paris"}}]})
    tool_call(row, '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>')   # 1.0

The response is read with the tool-call parser ``row.meta.get("parser", "hermes")``
(``mopd.envs.parsers``; ``row.meta["tools"]``, the function schemas, go to parsers that need them).
``row.meta["calls"]`` is a list of ``{"name": str, "arguments": dict}``; ``arguments`` may be a
JSON string of the object, or missing (no arguments). The reward is 1.0 when the response makes
exactly those calls: the same names, and arguments equal key by key as JSON data (``1`` equals
``1.0``, key order does not matter; ``true`` is not ``1``, ``"1"`` is not ``1``), in the same order,
or in any order when ``row.meta.get("unordered")`` is true (as a multiset: a call asked twice must
be made twice). Anything else scores 0.0: a missing, extra or unreadable call, a wrong name or
argument. There is no partial credit: a half-right call sequence still does the wrong thing, and a
0/1 reward leaves no per-call weighting to tune. A row whose ``calls`` is ``[]`` rewards making no call.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mopd.types import PromptRow

DEFAULT_PARSER = "hermes"


def _where(row: PromptRow) -> str:
    return f"{row.domain} prompt {row.prompt[:80]!r} (source {row.source or '?'}, row {row.index})"


def canonical(value: Any) -> Any:
    """A hashable form of JSON data in which equal data are equal: numbers by value (``1`` ==
    ``1.0``; not booleans), objects regardless of key order, arrays in order."""
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, int):
        return ("number", Fraction(value))
    if isinstance(value, float):
        return ("number", Fraction(value)) if math.isfinite(value) else ("float", repr(value))
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, dict):
        return ("object", frozenset((str(k), canonical(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("array", tuple(canonical(v) for v in value))
    return ("other", repr(value))


def _json(row: PromptRow, value: Any, what: str) -> Any:
    """``value``, decoded if it is a JSON string ("" is {}); malformed JSON is a ``ValueError``."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else {}
    except ValueError as e:
        raise ValueError(f"{_where(row)}: {what} is not valid JSON: {e}") from e


def _expected(row: PromptRow) -> list[tuple[str, Any]]:
    """(name, canonical arguments) of every call of ``row.meta["calls"]``; ``KeyError`` without
    it, ``ValueError`` for calls of another shape (both name the row)."""
    if "calls" not in row.meta:
        raise KeyError(f"{_where(row)} has no 'calls' in its meta; give the tool_call rows a 'calls' list")
    calls = _json(row, row.meta["calls"], "meta['calls']")
    if not isinstance(calls, list):
        raise ValueError(f"{_where(row)}: meta['calls'] must be a list of {{'name', 'arguments'}}, got {calls!r:.120}")
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"{_where(row)}: every call in meta['calls'] needs a 'name', got {call!r:.120}")
        args = _json(row, call.get("arguments", {}), f"the arguments of {call['name']!r}")
        if not isinstance(args, dict):
            raise ValueError(f"{_where(row)}: the arguments of {call['name']!r} must be an object, got {args!r:.120}")
        out.append((call["name"], canonical(args)))
    return out


def tool_call(row: PromptRow, response: str) -> float:
    """1.0 iff the response's tool calls are exactly ``row.meta["calls"]`` (module docstring)."""
    from mopd.envs.parsers import get_parser  # here: importing mopd.verifiers loads no torch (VerifierPool)

    expected = _expected(row)
    turn = get_parser(row.meta.get("parser", DEFAULT_PARSER)).parse(response, row.meta.get("tools", ()))
    if any(call.error for call in turn.calls):
        return 0.0
    made = [(call.name, canonical(call.arguments)) for call in turn.calls]
    if row.meta.get("unordered"):
        return 1.0 if Counter(made) == Counter(expected) else 0.0
    return 1.0 if made == expected else 0.0
