"""Sample prompt files in the formats of three public datasets, made here (no download), for
recipes/real_formats.yaml: grade-school maths as openai/gsm8k (``main``), Python tasks as
google-research-datasets/mbpp (``full``), and function calling as Salesforce/xlam-function-calling-60k.

    python scripts/real_format_data.py            # writes $MOPD_CACHE/real_formats (default ~/.cache/mopd)
    python scripts/real_format_data.py --out DIR  # somewhere else

What it writes, a train and a test file per set (the rows are this project's own, generated from
templates with a fixed seed: the same files on every call, and no question or task in both files):

- ``gsm8k/{train,test}.jsonl``: ``question``, and ``answer``: worked steps with GSM8K's calculator
  notes (``<<48/2=24>>``), then ``#### <number>`` (with thousands separators in some);
- ``mbpp/{train,test}.jsonl``: ``task_id``, ``text``, ``code`` (with MBPP's CRLF line ends),
  ``test_list`` (``assert ...`` strings), ``test_setup_code`` (empty) and ``challenge_test_list``
  (empty);
- ``xlam/{train,test}.json``: one JSON array, as xlam's file is: ``id``, ``query``, ``tools`` and
  ``answers`` (JSON strings, as in xlam), and ``messages``.

``messages`` (not in xlam) is what a chat student is shown: a system turn listing the row's tools
and the call format the ``tool_call`` verifier reads by default (hermes:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), then the user's query.
Every row's reference (GSM8K's answer, MBPP's code, xlam's answers) passes its verifier
(``math_answer``, ``code_tests``, ``tool_call``): tests/test_real_formats.py checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import cache_root  # noqa: E402

NAME = "real_formats"
SEED = 0
# Rows per split: (train, test).
SIZES = {"gsm8k": (40, 12), "mbpp": (22, 8), "xlam": (30, 10)}


def default_dir() -> Path:
    return cache_root() / NAME


# --------------------------------------------------------------------------- GSM8K

_PEOPLE = [
    ("Natalia", "she", "her"), ("Tom", "he", "his"), ("Priya", "she", "her"), ("Omar", "he", "his"),
    ("Lena", "she", "her"), ("Kenji", "he", "his"), ("Sofia", "she", "her"), ("Marcus", "he", "his"),
]  # fmt: skip
# A GSM8K problem: (question, worked steps, the final number, whether it is written with thousands separators).
Problem = tuple[str, list[str], int, bool]


def _pencils(rng: random.Random, name: str, he: str, his: str) -> Problem:
    a, b = rng.randint(3, 9), rng.randint(6, 24)
    c = rng.randint(2, a * b - 1)
    p, r = a * b, a * b - c
    q = (
        f"{name} buys {a} boxes of pencils. Each box holds {b} pencils. {he.capitalize()} gives {c} pencils "
        f"to {his} classmates. How many pencils does {name} have left?"
    )
    steps = [
        f"{name} buys {a} * {b} = <<{a}*{b}={p}>>{p} pencils.",
        f"{he.capitalize()} has {p} - {c} = <<{p}-{c}={r}>>{r} pencils left.",
    ]
    return q, steps, r, False


def _wages(rng: random.Random, name: str, he: str, his: str) -> Problem:
    w, h, k = rng.randint(15, 40), rng.randint(20, 40), rng.randint(4, 12)
    x, y = w * h, w * h * k
    q = f"{name} earns ${w} an hour and works {h} hours each week. How much money does {he} earn in {k} weeks?"
    steps = [
        f"In one week {he} earns {w} * {h} = $<<{w}*{h}={x}>>{x}.",
        f"In {k} weeks {he} earns {x} * {k} = $<<{x}*{k}={y}>>{y:,}.",
    ]
    return q, steps, y, True


def _train(rng: random.Random, name: str, he: str, his: str) -> Problem:
    s1, t1, s2, t2 = rng.randint(40, 90), rng.randint(2, 6), rng.randint(30, 80), rng.randint(1, 5)
    d1, d2 = s1 * t1, s2 * t2
    q = (
        f"A train travels at {s1} miles per hour for {t1} hours, then at {s2} miles per hour for {t2} hours. "
        "How many miles does the train travel in total?"
    )
    steps = [
        f"First it travels {s1} * {t1} = <<{s1}*{t1}={d1}>>{d1} miles.",
        f"Then it travels {s2} * {t2} = <<{s2}*{t2}={d2}>>{d2} miles.",
        f"In total it travels {d1} + {d2} = <<{d1}+{d2}={d1 + d2}>>{d1 + d2} miles.",
    ]
    return q, steps, d1 + d2, False


def _cookies(rng: random.Random, name: str, he: str, his: str) -> Problem:
    f, e, k = rng.randint(2, 8), rng.randint(3, 12), rng.randint(1, 6)
    r, n = f * e, f * e + k
    q = (
        f"{name} baked {n} cookies. {he.capitalize()} kept {k} for {his} family and shared the rest equally "
        f"among {f} friends. How many cookies did each friend get?"
    )
    steps = [
        f"{name} shared {n} - {k} = <<{n}-{k}={r}>>{r} cookies.",
        f"Each friend got {r} / {f} = <<{r}/{f}={e}>>{e} cookies.",
    ]
    return q, steps, e, False


def _discount(rng: random.Random, name: str, he: str, his: str) -> Problem:
    p, d = 20 * rng.randint(2, 15), rng.choice([10, 20, 25, 50])
    x = p * d // 100
    q = (
        f"{name} wants a jacket that costs ${p}. The store takes {d}% off the price. "
        f"How much does {he} pay for the jacket?"
    )
    steps = [
        f"The discount is {p} * {d} / 100 = $<<{p}*{d}/100={x}>>{x}.",
        f"{name} pays {p} - {x} = $<<{p}-{x}={p - x}>>{p - x}.",
    ]
    return q, steps, p - x, False


def _ages(rng: random.Random, name: str, he: str, his: str) -> Problem:
    a, b, k = rng.randint(6, 30), rng.randint(2, 12), rng.randint(2, 15)
    c = a + b
    q = (
        f"{name} is {a} years old. {his.capitalize()} brother is {b} years older. "
        f"How old will {his} brother be in {k} years?"
    )
    steps = [
        f"{his.capitalize()} brother is {a} + {b} = <<{a}+{b}={c}>>{c} years old.",
        f"In {k} years he will be {c} + {k} = <<{c}+{k}={c + k}>>{c + k}.",
    ]
    return q, steps, c + k, False


def _legs(rng: random.Random, name: str, he: str, his: str) -> Problem:
    c, w = rng.randint(5, 40), rng.randint(2, 20)
    q = f"{name}'s farm has {c} chickens and {w} cows. How many legs do the animals have in total?"
    steps = [
        f"The chickens have {c} * 2 = <<{c}*2={2 * c}>>{2 * c} legs.",
        f"The cows have {w} * 4 = <<{w}*4={4 * w}>>{4 * w} legs.",
        f"Together they have {2 * c} + {4 * w} = <<{2 * c}+{4 * w}={2 * c + 4 * w}>>{2 * c + 4 * w} legs.",
    ]
    return q, steps, 2 * c + 4 * w, False


def _printer(rng: random.Random, name: str, he: str, his: str) -> Problem:
    p, h = rng.randint(12, 45), rng.randint(2, 8)
    m, t = 60 * h, 60 * h * p
    q = f"{name}'s printer prints {p} pages per minute. How many pages does it print in {h} hours?"
    steps = [
        f"{h} hours is {h} * 60 = <<{h}*60={m}>>{m} minutes.",
        f"It prints {m} * {p} = <<{m}*{p}={t}>>{t:,} pages.",
    ]
    return q, steps, t, True


GSM8K_TEMPLATES = [_pencils, _wages, _train, _cookies, _discount, _ages, _legs, _printer]


def gsm8k_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` distinct GSM8K-style rows, the templates in turn: ``question``, and ``answer`` = the
    steps, then ``#### <number>`` (with thousands separators where the template writes them)."""
    rows: dict[str, dict[str, Any]] = {}
    i = 0
    while len(rows) < n:
        name, he, his = rng.choice(_PEOPLE)
        question, steps, final, commas = GSM8K_TEMPLATES[i % len(GSM8K_TEMPLATES)](rng, name, he, his)
        i += 1
        answer = "\n".join([*steps, f"#### {final:,}" if commas else f"#### {final}"])
        rows.setdefault(question, {"question": question, "answer": answer})
    return list(rows.values())


# --------------------------------------------------------------------------- MBPP


def _ints(rng: random.Random, k: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(k)]


def _word(rng: random.Random) -> str:
    return rng.choice(["apple", "level", "python", "radar", "table", "moon", "noon", "stats", "river", "code"])


def _sentence(rng: random.Random) -> str:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "red", "sun"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 6)))


def _anagram_pair(rng: random.Random) -> tuple[str, str]:
    """A word and, half the time, a shuffle of it (else another word)."""
    word = _word(rng)
    return word, "".join(rng.sample(word, len(word))) if rng.random() < 0.5 else _word(rng)


@dataclass(frozen=True)
class Task:
    """An MBPP-style task: the function's name, the task text, a reference solution, and a
    function drawing the arguments of one test."""

    name: str
    text: str
    code: str
    draw: Callable[[random.Random], tuple[Any, ...]]


def _task(name: str, text: str, code: str, draw: Callable[[random.Random], tuple[Any, ...]]) -> Task:
    return Task(name, text, textwrap.dedent(code).strip("\n"), draw)


MBPP_TASKS = [
    _task(
        "sum_of_squares",
        "Write a python function to find the sum of squares of the first n natural numbers.",
        """
        def sum_of_squares(n):
            return sum(i * i for i in range(1, n + 1))
        """,
        lambda r: (r.randint(1, 30),),
    ),
    _task(
        "reverse_words",
        "Write a function to reverse the order of the words in a given string.",
        """
        def reverse_words(s):
            return ' '.join(reversed(s.split()))
        """,
        lambda r: (_sentence(r),),
    ),
    _task(
        "count_vowels",
        "Write a python function to count the vowels in a string.",
        """
        def count_vowels(s):
            return sum(1 for c in s.lower() if c in 'aeiou')
        """,
        lambda r: (_sentence(r),),
    ),
    _task(
        "max_of_three",
        "Write a function to find the maximum of three numbers.",
        """
        def max_of_three(a, b, c):
            return max(a, b, c)
        """,
        lambda r: tuple(_ints(r, 3)),
    ),
    _task(
        "is_palindrome",
        "Write a function to check whether a given string is a palindrome or not.",
        """
        def is_palindrome(s):
            return s == s[::-1]
        """,
        lambda r: (_word(r),),
    ),
    _task(
        "second_largest",
        "Write a function to find the second largest number in a list of distinct numbers.",
        """
        def second_largest(nums):
            return sorted(nums)[-2]
        """,
        lambda r: (r.sample(range(-50, 100), r.randint(3, 7)),),
    ),
    _task(
        "remove_duplicates",
        "Write a function to remove duplicates from a list, keeping the first occurrence of each element.",
        """
        def remove_duplicates(lst):
            seen = []
            for x in lst:
                if x not in seen:
                    seen.append(x)
            return seen
        """,
        lambda r: (_ints(r, r.randint(4, 9), 0, 5),),
    ),
    _task(
        "flatten_list",
        "Write a function to flatten a list of lists into a single list.",
        """
        def flatten_list(lists):
            return [x for sub in lists for x in sub]
        """,
        lambda r: ([_ints(r, r.randint(0, 3), 0, 9) for _ in range(r.randint(2, 4))],),
    ),
    _task(
        "char_frequency",
        "Write a function to count the frequency of each character in a given string.",
        """
        def char_frequency(s):
            freq = {}
            for c in s:
                freq[c] = freq.get(c, 0) + 1
            return freq
        """,
        lambda r: (_word(r),),
    ),
    _task(
        "even_numbers",
        "Write a python function to find the even numbers in a list.",
        """
        def even_numbers(lst):
            return [x for x in lst if x % 2 == 0]
        """,
        lambda r: (_ints(r, r.randint(3, 8)),),
    ),
    _task(
        "find_gcd",
        "Write a python function to find the greatest common divisor of two positive integers.",
        """
        def find_gcd(a, b):
            while b:
                a, b = b, a % b
            return a
        """,
        lambda r: (r.randint(1, 120), r.randint(1, 120)),
    ),
    _task(
        "find_lcm",
        "Write a python function to find the least common multiple of two positive integers.",
        """
        def find_lcm(a, b):
            x, y = a, b
            while y:
                x, y = y, x % y
            return a * b // x
        """,
        lambda r: (r.randint(1, 30), r.randint(1, 30)),
    ),
    _task(
        "factorial",
        "Write a function to find the factorial of a number.",
        """
        def factorial(n):
            result = 1
            for i in range(2, n + 1):
                result *= i
            return result
        """,
        lambda r: (r.randint(0, 12),),
    ),
    _task(
        "fibonacci",
        "Write a function to find the n-th fibonacci number, with fibonacci(1) = fibonacci(2) = 1.",
        """
        def fibonacci(n):
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a
        """,
        lambda r: (r.randint(1, 25),),
    ),
    _task(
        "is_prime",
        "Write a function to check if the given integer is a prime number.",
        """
        def is_prime(n):
            if n < 2:
                return False
            i = 2
            while i * i <= n:
                if n % i == 0:
                    return False
                i += 1
            return True
        """,
        lambda r: (r.randint(0, 100),),
    ),
    _task(
        "digit_sum",
        "Write a python function to get the sum of the digits of a non-negative integer.",
        """
        def digit_sum(n):
            return sum(int(d) for d in str(n))
        """,
        lambda r: (r.randint(0, 99999),),
    ),
    _task(
        "merge_sorted",
        "Write a function to merge two sorted lists into one sorted list.",
        """
        def merge_sorted(a, b):
            return sorted(a + b)
        """,
        lambda r: (sorted(_ints(r, r.randint(1, 4))), sorted(_ints(r, r.randint(1, 4)))),
    ),
    _task(
        "rotate_right",
        "Write a function to rotate a given list by k items to the right.",
        """
        def rotate_right(lst, k):
            if not lst:
                return lst
            k = k % len(lst)
            return lst[-k:] + lst[:-k]
        """,
        lambda r: (_ints(r, r.randint(2, 6), 0, 9), r.randint(0, 8)),
    ),
    _task(
        "list_product",
        "Write a python function to multiply all the numbers in a list.",
        """
        def list_product(lst):
            p = 1
            for x in lst:
                p *= x
            return p
        """,
        lambda r: (_ints(r, r.randint(1, 5), -5, 9),),
    ),
    _task(
        "index_of_min",
        "Write a function to find the index of the smallest element of a list (the first one if it repeats).",
        """
        def index_of_min(lst):
            return lst.index(min(lst))
        """,
        lambda r: (_ints(r, r.randint(2, 7)),),
    ),
    _task(
        "count_occurrences",
        "Write a python function to count the occurrences of a number in a list.",
        """
        def count_occurrences(lst, x):
            return lst.count(x)
        """,
        lambda r: (_ints(r, r.randint(3, 9), 0, 4), r.randint(0, 4)),
    ),
    _task(
        "capitalize_words",
        "Write a function to capitalize the first letter of every word in a string.",
        """
        def capitalize_words(s):
            return ' '.join(w.capitalize() for w in s.split())
        """,
        lambda r: (_sentence(r),),
    ),
    _task(
        "are_anagrams",
        "Write a function to check whether two strings are anagrams of each other.",
        """
        def are_anagrams(a, b):
            return sorted(a) == sorted(b)
        """,
        lambda r: _anagram_pair(r),
    ),
    _task(
        "decimal_to_binary",
        "Write a function to convert a non-negative decimal number to its binary representation as a string.",
        """
        def decimal_to_binary(n):
            return bin(n)[2:]
        """,
        lambda r: (r.randint(0, 300),),
    ),
    _task(
        "binary_to_decimal",
        "Write a function to convert a binary string to a decimal integer.",
        """
        def binary_to_decimal(s):
            n = 0
            for c in s:
                n = 2 * n + int(c)
            return n
        """,
        lambda r: (bin(r.randint(0, 300))[2:],),
    ),
    _task(
        "common_elements",
        "Write a function to find the common elements of two lists, in increasing order and without repeats.",
        """
        def common_elements(a, b):
            return sorted(set(a) & set(b))
        """,
        lambda r: (_ints(r, r.randint(2, 7), 0, 9), _ints(r, r.randint(2, 7), 0, 9)),
    ),
    _task(
        "cumulative_sum",
        "Write a function to find the running totals of a list of numbers.",
        """
        def cumulative_sum(lst):
            out, total = [], 0
            for x in lst:
                total += x
                out.append(total)
            return out
        """,
        lambda r: (_ints(r, r.randint(1, 6)),),
    ),
    _task(
        "longest_word",
        "Write a python function to find the longest word of a sentence (the first one if several are as long).",
        """
        def longest_word(s):
            return max(s.split(), key=len)
        """,
        lambda r: (_sentence(r),),
    ),
    _task(
        "toggle_case",
        "Write a function to toggle the case of every letter in a string.",
        """
        def toggle_case(s):
            return s.swapcase()
        """,
        lambda r: (r.choice(["Hello World", "PyThOn", "mOPD", "Data Set 7"]),),
    ),
    _task(
        "pairs_to_dict",
        "Write a function to convert a list of (key, value) tuples into a dictionary.",
        """
        def pairs_to_dict(pairs):
            return dict(pairs)
        """,
        lambda r: ([(_word(r), r.randint(0, 9)) for _ in range(r.randint(1, 4))],),
    ),
]
TESTS_PER_TASK = 3


def _call(name: str, args: tuple[Any, ...]) -> str:
    return f"{name}({', '.join(map(repr, args))})"


def mbpp_row(
    rng: random.Random, task_id: int, task: tuple[str, str, str, Callable[..., tuple[Any, ...]]]
) -> dict[str, Any]:
    """One MBPP-style row: the tests are three calls with drawn arguments, their expected values
    computed by running the reference code here (our own code, not model output)."""
    namespace: dict[str, Any] = {}
    exec(task.code, namespace)  # the reference solutions above
    tests = []
    for _ in range(TESTS_PER_TASK):
        args = task.draw(rng)
        tests.append(f"assert {_call(task.name, args)} == {namespace[task.name](*args)!r}")
    return {
        "task_id": task_id,
        "text": task.text,
        "code": task.code.replace("\n", "\r\n"),  # MBPP's solutions have Windows line ends
        "test_list": tests,
        "test_setup_code": "",
        "challenge_test_list": [],
    }


# --------------------------------------------------------------------------- xlam function calling


def _param(description: str, type_: str, default: Any = None) -> dict[str, Any]:
    spec = {"description": description, "type": type_}
    if default is not None:
        spec["default"] = default
    return spec


# xlam's tool format: name, description, and parameters as {name: {description, type[, default]}}.
TOOLS: dict[str, dict[str, Any]] = {
    t["name"]: t
    for t in [
        {"name": "get_weather", "description": "Get the current weather of a city.",
         "parameters": {"city": _param("The name of the city.", "str"),
                        "units": _param("'celsius' or 'fahrenheit'.", "str, optional", "celsius")}},
        {"name": "convert_currency", "description": "Convert an amount of money from one currency to another.",
         "parameters": {"amount": _param("The amount to convert.", "float"),
                        "from_currency": _param("The ISO code of the currency to convert from.", "str"),
                        "to_currency": _param("The ISO code of the currency to convert to.", "str")}},
        {"name": "get_stock_price", "description": "Fetch the latest price of a stock.",
         "parameters": {"symbol": _param("The ticker symbol, e.g. 'AAPL'.", "str")}},
        {"name": "search_restaurants", "description": "Search restaurants in a location by cuisine.",
         "parameters": {"location": _param("The city or neighbourhood.", "str"),
                        "cuisine": _param("The type of food.", "str"),
                        "max_results": _param("How many restaurants to return.", "int, optional", 5)}},
        {"name": "calculate_bmi", "description": "Calculate the body mass index.",
         "parameters": {"weight_kg": _param("The weight in kilograms.", "float"),
                        "height_m": _param("The height in metres.", "float")}},
        {"name": "get_time", "description": "Get the current local time in a time zone.",
         "parameters": {"timezone": _param("An IANA time zone name, e.g. 'Europe/Paris'.", "str")}},
        {"name": "translate_text", "description": "Translate a text into another language.",
         "parameters": {"text": _param("The text to translate.", "str"),
                        "target_language": _param("The language to translate into.", "str")}},
        {"name": "find_flights", "description": "Find flights between two airports on a date.",
         "parameters": {"origin": _param("The IATA code of the departure airport.", "str"),
                        "destination": _param("The IATA code of the arrival airport.", "str"),
                        "date": _param("The date, YYYY-MM-DD.", "str")}},
        {"name": "is_prime", "description": "Check whether a number is prime.",
         "parameters": {"num": _param("The number to check.", "int")}},
        {"name": "convert_units", "description": "Convert a length from one unit to another.",
         "parameters": {"value": _param("The length to convert.", "float"),
                        "from_unit": _param("The unit of the value, e.g. 'km'.", "str"),
                        "to_unit": _param("The unit to convert to, e.g. 'mi'.", "str")}},
    ]
}  # fmt: skip

_CITIES = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Toronto", "Mumbai", "Sydney", "Cairo", "Berlin"]
_CURRENCIES = ["USD", "EUR", "JPY", "GBP", "INR", "CAD"]
_SYMBOLS = ["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "GOOGL"]
_CUISINES = ["Italian", "Thai", "Mexican", "Ethiopian", "Japanese", "vegan"]
_ZONES = ["Europe/Paris", "Asia/Tokyo", "America/New_York", "Africa/Nairobi", "Australia/Sydney"]
_PHRASES = ["Good morning", "Where is the station?", "Thank you very much", "See you tomorrow"]
_LANGUAGES = ["French", "Spanish", "German", "Japanese", "Swahili"]
_AIRPORTS = ["JFK", "LHR", "CDG", "NRT", "NBO", "SYD", "YYZ"]
_UNITS = [("km", "mi", "kilometres", "miles"), ("m", "ft", "metres", "feet"), ("in", "cm", "inches", "centimetres")]

Call = tuple[str, dict[str, Any]]


def _date(rng: random.Random) -> str:
    return f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _weather(rng: random.Random) -> tuple[str, list[Call]]:
    a, b = rng.sample(_CITIES, 2)
    if rng.random() < 0.4:
        return f"What's the weather like in {a} and in {b} right now?", [
            ("get_weather", {"city": a}),
            ("get_weather", {"city": b}),
        ]
    return f"How hot is it in {a} today, in fahrenheit?", [("get_weather", {"city": a, "units": "fahrenheit"})]


def _money(rng: random.Random) -> tuple[str, list[Call]]:
    amount = rng.choice([50, 120, 250, 999.99, 1500])
    src, dst = rng.sample(_CURRENCIES, 2)
    return f"How much is {amount} {src} in {dst}?", [
        ("convert_currency", {"amount": amount, "from_currency": src, "to_currency": dst})
    ]


def _stocks(rng: random.Random) -> tuple[str, list[Call]]:
    a, b = rng.sample(_SYMBOLS, 2)
    return f"Get me the current stock prices of {a} and {b}.", [
        ("get_stock_price", {"symbol": a}),
        ("get_stock_price", {"symbol": b}),
    ]


def _restaurants(rng: random.Random) -> tuple[str, list[Call]]:
    city, food = rng.choice(_CITIES), rng.choice(_CUISINES)
    if rng.random() < 0.5:
        k = rng.randint(2, 4)
        return f"Find the top {k} {food} restaurants in {city}.", [
            ("search_restaurants", {"location": city, "cuisine": food, "max_results": k})
        ]
    return f"Are there any good {food} places in {city}?", [("search_restaurants", {"location": city, "cuisine": food})]


def _bmi(rng: random.Random) -> tuple[str, list[Call]]:
    w, h = rng.randint(50, 100), rng.choice([1.55, 1.62, 1.7, 1.78, 1.85])
    return f"I weigh {w} kg and I am {h} m tall. What is my BMI?", [("calculate_bmi", {"weight_kg": w, "height_m": h})]


def _time_and_translate(rng: random.Random) -> tuple[str, list[Call]]:
    zone, phrase, lang = rng.choice(_ZONES), rng.choice(_PHRASES), rng.choice(_LANGUAGES)
    return f"What time is it in {zone}? Also, translate '{phrase}' into {lang}.", [
        ("get_time", {"timezone": zone}),
        ("translate_text", {"text": phrase, "target_language": lang}),
    ]


def _flights(rng: random.Random) -> tuple[str, list[Call]]:
    a, b = rng.sample(_AIRPORTS, 2)
    day = _date(rng)
    return f"Show me flights from {a} to {b} on {day}.", [
        ("find_flights", {"origin": a, "destination": b, "date": day})
    ]


def _primes(rng: random.Random) -> tuple[str, list[Call]]:
    nums = rng.sample(range(2, 200), rng.randint(1, 3))
    listed = nums[0] if len(nums) == 1 else ", ".join(map(str, nums[:-1])) + f" and {nums[-1]}"
    return f"Is {listed} prime?" if len(nums) == 1 else f"Check whether {listed} are prime numbers.", [
        ("is_prime", {"num": n}) for n in nums
    ]


def _units(rng: random.Random) -> tuple[str, list[Call]]:
    src, dst, src_name, dst_name = rng.choice(_UNITS)
    value = rng.choice([3, 12.5, 42, 100])
    return f"Convert {value} {src_name} to {dst_name}.", [
        ("convert_units", {"value": value, "from_unit": src, "to_unit": dst})
    ]


XLAM_TEMPLATES = [_weather, _money, _stocks, _restaurants, _bmi, _time_and_translate, _flights, _primes, _units]

SYSTEM_PROMPT = (
    "You are a function-calling assistant. These functions are available:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, write its name and arguments as a JSON object inside <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <an object of its arguments>}}\n</tool_call>\n'
    "Write one such block per call, in the order the user asks, and leave out optional arguments the "
    "user did not give."
)


def tool_messages(query: str, tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """What a chat student is shown of an xlam row: a system turn listing ``tools`` (one JSON per
    line) and the call format (hermes, the tool_call verifier's default), then the user's query."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return [{"role": "system", "content": SYSTEM_PROMPT.format(tools=listed)}, {"role": "user", "content": query}]


def xlam_row(
    rng: random.Random, row_id: int, template: Callable[[random.Random], tuple[str, list[Call]]]
) -> dict[str, Any]:
    """One xlam-style row: the tools it needs and one or two others, in a random order; ``tools``
    and ``answers`` as JSON strings (as xlam has them), ``messages`` derived from them."""
    query, calls = template(rng)
    needed = list(dict.fromkeys(name for name, _ in calls))
    others = rng.sample(sorted(set(TOOLS) - set(needed)), rng.randint(1, 2))
    names = needed + others
    rng.shuffle(names)
    tools = [TOOLS[n] for n in names]
    answers = [{"name": name, "arguments": args} for name, args in calls]
    return {
        "id": row_id,
        "query": query,
        "tools": json.dumps(tools, ensure_ascii=False),
        "answers": json.dumps(answers, ensure_ascii=False),
        "messages": tool_messages(query, tools),
    }


def xlam_rows(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` rows with distinct queries, the templates in turn, ids from 0."""
    rows: dict[str, dict[str, Any]] = {}
    i = 0
    while len(rows) < n:
        row = xlam_row(rng, len(rows), XLAM_TEMPLATES[i % len(XLAM_TEMPLATES)])
        i += 1
        rows.setdefault(row["query"], row)
    return list(rows.values())


# --------------------------------------------------------------------------- writing


def sample_rows(seed: int = SEED) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Every set's rows by split (``train``, ``test``); held-out rows are other questions (GSM8K,
    xlam) or other tasks (MBPP) than the training ones."""
    rng = random.Random(f"real_formats/{seed}")
    out = {}
    n_train, n_test = SIZES["gsm8k"]
    rows = gsm8k_rows(rng, n_train + n_test)
    out["gsm8k"] = {"train": rows[:n_train], "test": rows[n_train:]}
    n_train, n_test = SIZES["mbpp"]
    tasks = rng.sample(MBPP_TASKS, n_train + n_test)
    # MBPP's own ids: test tasks 11-510, train tasks 601-974.
    out["mbpp"] = {
        "train": [mbpp_row(rng, 601 + i, t) for i, t in enumerate(tasks[:n_train])],
        "test": [mbpp_row(rng, 11 + i, t) for i, t in enumerate(tasks[n_train:])],
    }
    n_train, n_test = SIZES["xlam"]
    rows = xlam_rows(rng, n_train + n_test)
    out["xlam"] = {"train": rows[:n_train], "test": rows[n_train:]}
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Written beside, then renamed: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write(out: str | os.PathLike | None = None, seed: int = SEED) -> dict[str, Path]:
    """The six files under ``out`` (default ``default_dir()``); returns them as ``<set>/<split>`` -> path."""
    root = Path(out) if out is not None else default_dir()
    files = {}
    for name, splits in sample_rows(seed).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            if name == "xlam":  # xlam's file is one JSON array
                path, text = root / name / f"{split}.json", json.dumps(rows, indent=1, ensure_ascii=False) + "\n"
            else:
                path = root / name / f"{split}.jsonl"
                text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            _write_atomic(path, text)
            files[f"{name}/{split}"] = path
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help=f"target directory (default: $MOPD_CACHE/{NAME}, now {default_dir()})")
    parser.add_argument("--seed", type=int, default=SEED, help="another seed gives other rows (default %(default)s)")
    args = parser.parse_args(argv)
    for key, path in write(args.out, args.seed).items():
        print(f"{key}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
