"""Synthetic tool use: turn a one-line request into exactly one tool call.

    weather in Paris ->             weather(Paris)     level 1
    what time is it in Oslo ->      time(Oslo)         level 1
    ring bob now ->                 dial(bob)          level 1
    how many eur for 12 usd ->      fx(12,usd,eur)     level 2 (default)
    wake me in 5 min ->             timer(5)           level 2
    put on jazz music ->            play(jazz)         level 2
    send ann a note on rent ->      mail(ann,rent)     level 3
    reserve for 4 people in Rome -> book(Rome,4)       level 3

Each tool has several phrasings; the call format is strict: ``name(arg,arg)``, no spaces, no
quotes, arguments in the tool's fixed order (which is not always the order of the request).

``agent_lookup`` (the quickstart's agent domain) is the multi-turn form: the ``dial`` and ``mail``
requests whose call needs the person's number, which only the ``lookup`` tool of the ``lookup``
environment returns (mopd/envs/builtin.py); its rows carry the table and the tool schema in
``meta``, so a JSONL copy of them is complete.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from mopd.domains import register_generator
from mopd.domains.common import check_split, register_levels, sample_split, split_of
from mopd.types import PromptRow

DOMAIN = "agent"
DEFAULT_LEVEL = 2
PROMPT_END = " ->"  # marks where the request ends and the call begins

# A few real names first (the examples above), then generated ones: the slot spaces are far larger
# than any train set, so a model must learn to copy the slot from the request rather than memorise
# request -> call pairs, and a level-1 eval split holds thousands of distinct prompts.
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
CITIES = tuple(dict.fromkeys(("Paris", "Oslo", "Lima", "Rome", "Cairo", "Tokyo") + tuple(
    (a + v + b + w).capitalize() for a in _CONSONANTS for v in _VOWELS for b in _CONSONANTS for w in _VOWELS
)))  # fmt: skip
NAMES = tuple(dict.fromkeys(("bob", "ann", "eve", "tom") + tuple(
    a + v + b for a in _CONSONANTS for v in _VOWELS for b in _CONSONANTS if a != b
)))  # fmt: skip
CURRENCIES = ("usd", "eur", "gbp", "jpy", "chf", "cad")
GENRES = (
    "jazz", "rock", "pop", "folk", "blues", "opera", "rap", "metal",
    "soul", "funk", "house", "disco", "samba", "salsa", "indie", "punk",
)  # fmt: skip
TOPICS = ("tea", "rent", "lunch", "golf", "exam", "trip", "cats", "code")


def _numbers(lo: int, hi: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(lo, hi + 1))


@dataclass(frozen=True)
class Tool:
    """A tool: the request phrasings that call it and the call they must produce."""

    name: str
    level: int
    phrasings: tuple[str, ...]  # templates over the slots, e.g. "weather in {city}"
    call: str  # answer template, e.g. "weather({city})"
    slots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    distinct: tuple[str, ...] = ()  # slots that must take different values


TOOLS: tuple[Tool, ...] = (
    Tool("weather", 1, ("weather in {city}", "forecast for {city}", "is it cold in {city}", "will it rain in {city}",
                         "how warm is {city}"),
         "weather({city})", {"city": CITIES}),
    Tool("time", 1, ("time in {city}", "what time is it in {city}", "clock for {city}", "local time {city}"),
         "time({city})", {"city": CITIES}),
    Tool("dial", 1, ("call {name}", "phone {name}", "ring {name} now", "give {name} a call"),
         "dial({name})", {"name": NAMES}),
    Tool("fx", 2, ("convert {amount} {src} to {dst}", "{amount} {src} in {dst}", "how much is {amount} {src} in {dst}",
                   "how many {dst} for {amount} {src}"),
         "fx({amount},{src},{dst})", {"amount": _numbers(1, 99), "src": CURRENCIES, "dst": CURRENCIES}, ("src", "dst")),
    Tool("timer", 2, ("set a timer for {n} min", "timer {n} minutes", "wake me in {n} min"),
         "timer({n})", {"n": _numbers(1, 60)}),
    Tool("play", 2, ("play some {genre}", "put on {genre} music", "i want to hear {genre}", "music: {genre}"),
         "play({genre})", {"genre": GENRES}),
    Tool("mail", 3, ("email {name} about {topic}", "send {name} a note on {topic}", "mail {name} re {topic}"),
         "mail({name},{topic})", {"name": NAMES, "topic": TOPICS}),
    Tool("book", 3, ("table for {n} in {city}", "book {n} seats in {city}", "reserve for {n} people in {city}"),
         "book({city},{n})", {"n": _numbers(1, 9), "city": CITIES}),
)  # fmt: skip
LEVELS = (1, 2, 3)


def _fill(rng: random.Random, tool: Tool) -> dict[str, str]:
    """Slot values for one request; redrawn until the ``distinct`` slots differ."""
    while True:
        values = {slot: rng.choice(choices) for slot, choices in tool.slots.items()}
        if len({values[s] for s in tool.distinct}) == len(tool.distinct):
            return values


def render(tool: Tool, phrasing: int, values: dict[str, str]) -> tuple[str, str]:
    """(prompt, answer) of ``tool`` asked with phrasing number ``phrasing``."""
    return tool.phrasings[phrasing].format(**values) + PROMPT_END, tool.call.format(**values)


def draw(rng: random.Random, level: int = DEFAULT_LEVEL) -> tuple[str, str, str]:
    """One (prompt, answer, tool name) at ``level``: a tool uniformly, then a phrasing and slots."""
    tool = rng.choice([t for t in TOOLS if t.level <= level])
    phrasing = rng.randrange(len(tool.phrasings))
    prompt, answer = render(tool, phrasing, _fill(rng, tool))
    return prompt, answer, tool.name


def generate(rng: random.Random, n: int, split: str, level: int = DEFAULT_LEVEL) -> list[PromptRow]:
    """``n`` tool-use prompts of ``split`` ("train" or "eval"), drawn with ``rng``."""
    if level not in LEVELS:
        raise ValueError(f"agent: unknown level {level}; valid: {', '.join(map(str, LEVELS))}")
    return sample_split(rng, n, split, DOMAIN, lambda r: draw(r, level))


# The ``lookup`` tool's schema (as ``mopd.envs.base.function_schema`` writes it; tests/test_envs.py
# holds them equal): written out, since the environments import this module.
LOOKUP_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "The number saved for a person.",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "the person's name"}},
            "required": ["name"],
        },
    },
}
LOOKUP_KINDS = ("dial", "mail")  # the agent domain's requests that name a person
DISTRACTORS = 2  # other people in each row's table, so the key the student looks up matters


def draw_lookup(rng: random.Random) -> tuple[str, str, str, str, dict[str, str]]:
    """(prompt, answer, kind, key, table): a request naming a person (``key``) and the call with
    their number, which only ``table`` holds."""
    kind = rng.choice(LOOKUP_KINDS)
    tool = next(t for t in TOOLS if t.name == kind)
    values = {slot: rng.choice(choices) for slot, choices in tool.slots.items()}
    prompt, _ = render(tool, rng.randrange(len(tool.phrasings)), values)
    people = {values["name"], *rng.sample(NAMES, DISTRACTORS + 1)}
    table = {p: str(rng.randrange(100, 1000)) for p in sorted(people)}
    answer = tool.call.format(**{**values, "name": table[values["name"]]})
    return prompt, answer, tool.name, values["name"], table


def lookup_rows(rng: random.Random, n: int, split: str, domain: str = DOMAIN) -> list[PromptRow]:
    """``n`` rows of ``split`` for the ``lookup`` environment (the same prompt may recur with
    another number: the answer is drawn per row)."""
    check_split(split)
    rows: list[PromptRow] = []
    while len(rows) < n:
        prompt, answer, kind, key, table = draw_lookup(rng)
        if split_of(prompt) == split:
            meta = {"answer": answer, "kind": kind, "key": key, "table": table, "tools": [LOOKUP_TOOL]}
            rows.append(PromptRow(prompt, domain, meta, source="generator:agent_lookup", index=len(rows)))
    return rows


def generate_lookup(rng: random.Random, n: int, split: str) -> list[PromptRow]:
    """``n`` rows of ``split`` for the ``lookup`` environment (``lookup_rows``)."""
    return lookup_rows(rng, n, split, DOMAIN)


register_levels(DOMAIN, generate, LEVELS, DEFAULT_LEVEL)
register_generator("agent_lookup", generate_lookup)
