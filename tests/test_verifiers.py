"""The built-in verifiers for real data (``mopd.verifiers``): math answers by equivalence, programs
against tests in the sandbox, tool calls as data, exact match; resolving them by name or
``module:function``; scoring a batch concurrently with the same results as one at a time.

Tests that run programs need a kernel layer of the sandbox (our namespaces as root, else
bubblewrap): they skip where neither works and fail where ``MOPD_REQUIRE`` names it
(tests/features.py).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from features import require
from mopd import sandbox
from mopd.domains.common import exact_match
from mopd.types import PromptRow
from mopd.verifiers import (
    BUILTIN_VERIFIERS,
    ERRORS,
    VerifierPool,
    code_tests,
    final_answer,
    math_answer,
    resolve_verifier,
    tool_call,
    verifier_executes,
    verify_batch,
)
from mopd.verifiers.tool_call import canonical

# The modules (the package's attributes of these names are the functions).
ct = importlib.import_module("mopd.verifiers.code_tests")
ma = importlib.import_module("mopd.verifiers.math_answer")


def _row(domain: str = "math", **meta) -> PromptRow:
    return PromptRow("the question", domain, meta=meta, source="test", index=7)


@pytest.fixture
def kernel():
    """code_tests runs programs; only with a kernel layer (as root our namespaces, else bwrap)."""
    if sandbox.isolation() == "basic":
        require("sandbox" if os.geteuid() == 0 else "bwrap")


# ---------------------------------------------------------------------- math_answer

# (gold meta["answer"], response, reward). Percentages: math_verify takes 50% as equal to both 50
# and 0.5 (a "what percent" answer is often given without the sign, a fraction asked as a percent);
# decimals must be right to math_verify's 6 places (1/3 vs 0.33 is wrong, vs 0.333333 right).
MATH_PAIRS = [
    # GSM8K: the gold after ####, thousands separators
    ("#### 1,234", "#### 1234", 1),
    ("#### 1234", "The answer is 1,234.", 1),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "She sold 72 clips in total.\n#### 72", 1),
    ("#### 72", "#### 73", 0),
    (7, "#### 7", 1),
    ("1000000", "\\boxed{1,000,000}", 1),
    # fractions, decimals, \dfrac
    ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", 1),
    ("0.5", "\\boxed{\\frac12}", 1),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", 1),
    ("\\frac{1}{2}", "\\boxed{1/2}", 1),
    ("\\frac{1}{2}", "\\boxed{2/4}", 1),
    ("\\frac{1}{3}", "\\boxed{0.33}", 0),
    ("\\frac{1}{3}", "\\boxed{0.333333}", 1),
    ("\\frac{1}{3}", "\\boxed{\\frac{1}{4}}", 0),
    ("1.5", "\\boxed{\\frac{3}{2}}", 1),
    ("10", "\\boxed{10.0}", 1),
    # percent
    ("50\\%", "\\boxed{50}", 1),
    ("50\\%", "\\boxed{0.5}", 1),
    ("50", "The answer is 50%.", 1),
    ("0.75", "\\boxed{75\\%}", 1),
    ("50\\%", "\\boxed{5}", 0),
    # units, currency, degrees
    ("5 \\text{ cm}", "\\boxed{5}", 1),
    ("5", "\\boxed{5 \\text{ cm}}", 1),
    ("5", "The answer is 5 cm.", 1),
    ("18", "The answer is 18 dollars.", 1),
    ("\\$18", "\\boxed{18}", 1),
    ("18", "\\boxed{\\$18.00}", 1),
    ("100", "\\boxed{100^\\circ}", 1),
    # intervals, sets, tuples
    ("(1, 2]", "\\boxed{(1,2]}", 1),
    ("(1, 2]", "\\boxed{[1, 2]}", 0),
    ("[1, 2)", "\\boxed{\\left[1, 2\\right)}", 1),
    ("(-\\infty, 3)", "\\boxed{(-\\infty, 3)}", 1),
    ("(-\\infty, 3)", "\\boxed{(-\\infty, 3]}", 0),
    ("\\{1, 2, 3\\}", "\\boxed{\\{3, 2, 1\\}}", 1),
    ("\\{1, 2, 3\\}", "\\boxed{\\{1, 2\\}}", 0),
    ("(2, 3)", "\\boxed{(3, 2)}", 0),
    # equations, roots, symbols
    ("3", "\\boxed{x = 3}", 1),
    ("x = 3", "\\boxed{3}", 1),
    ("3", "\\boxed{x = 4}", 0),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", 1),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}", 1),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", 1),
    ("\\sqrt{3}", "\\boxed{3}", 0),
    ("2", "\\boxed{\\sqrt{4}}", 1),
    ("-3", "\\boxed{-3}", 1),
    ("-3", "\\boxed{3}", 0),
    ("1000000", "\\boxed{10^6}", 1),
    ("2^{10}", "\\boxed{1024}", 1),
    ("\\pi", "\\boxed{3.14}", 0),
    ("2\\pi", "\\boxed{2\\pi}", 1),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1),
    ("x^2+1", "\\boxed{(x+1)^2}", 0),
    ("\\infty", "\\boxed{\\infty}", 1),
    ("\\text{(B)}", "\\boxed{B}", 1),
    # where the final answer is found
    ("3/4", "The final answer is $\\frac{3}{4}$.", 1),
    ("42", "I think it's 41. Actually 42", 1),
    ("12", "**Answer:** 12", 1),
    ("\\boxed{5}", "\\boxed{\\boxed{5}}", 1),
    ("42", "no numbers here", 0),
    ("1/2", "\\boxed{\\frac{1}{2}", 0),  # unclosed box: the last number, 2
]


@pytest.mark.parametrize("gold, response, reward", MATH_PAIRS)
def test_math_answer_pairs(gold, response, reward):
    assert math_answer(_row(answer=gold), response) == reward


@pytest.mark.parametrize(
    "text, answer",
    [
        ("so \\boxed{\\frac{1}{2}} first, then \\boxed{\\frac{\\sqrt{2}}{2}}.", "\\frac{\\sqrt{2}}{2}"),  # last, nested
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close it
        ("\\fbox{7}", "7"),
        ("$\\boxed{3}$ and then \\boxed{4", "3"),  # the last *complete* box
        ("box beats hashes: \\boxed{1}\n#### 2", "1"),
        ("12 + 30 = 42\n#### 42\nDone.", "42"),  # the rest of the line
        ("#### $1,000", "1,000"),
        ("Thus the answer is 3.5. Let me check: 3.5 * 2 = 7", "3.5"),  # up to the end of the sentence
        ("The answer is\n\n  $-7$", "-7"),  # the next line when the phrase ends its line
        ("Answer: 12 apples", "12"),  # a number followed by words: the number
        ("final answer: \\(x+1\\)", "x+1"),
        ("The answer is B.", "B"),
        ("between 1 and 1,234,567.5 units", "1,234,567.5"),  # the last number, thousands and all
        ("it is 3/4", "3/4"),
        ("went down to -12", "-12"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_final_answer_rules(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    "gold, bare",
    [
        ("Since 2+2=4, #### 4", "4"),
        ("so the answer is $\\boxed{\\dfrac{1}{2}}$.", "\\dfrac{1}{2}"),
        (3.5, "3.5"),
        (" 12 ", "12"),
    ],
)
def test_gold_answer_forms(gold, bare):
    assert ma.gold_answer(gold) == bare


def test_math_answer_without_answer_names_the_row():
    with pytest.raises(KeyError, match=r"math prompt 'the question' \(source test, row 7\) has no 'answer'"):
        math_answer(_row(), "\\boxed{1}")


def test_math_answer_from_worker_threads_matches_the_main_thread():
    """math_verify's default timeouts use signal.alarm, which raises in any thread but the main
    one; the verifier turns them off there (so a ThreadPoolExecutor can call it)."""
    pairs = MATH_PAIRS[:12]
    here = [math_answer(_row(answer=g), r) for g, r, _ in pairs]
    with ThreadPoolExecutor(2) as ex:
        there = list(ex.map(lambda p: math_answer(_row(answer=p[0]), p[1]), pairs))
    assert here == there == [float(w) for _, _, w in pairs]


def test_math_answer_cannot_hang_a_thread_or_the_main_thread(monkeypatch):
    """A power tower makes sympy compute without end: in a thread (no timeout) it is not parsed,
    in the main thread math_verify's timeout stops it."""
    tower = "\\boxed{10^{10^{10^{10}}}}"
    skipped = ma.OUTCOMES["skipped_risky"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(math_answer, _row(answer="5"), tower).result(timeout=30) == 0.0
    assert ma.OUTCOMES["skipped_risky"] == skipped + 1 and time.monotonic() - t0 < 5
    assert threading.current_thread() is threading.main_thread()
    monkeypatch.setattr(ma, "TIMEOUT_S", 1)
    t0 = time.monotonic()
    assert math_answer(_row(answer="5"), tower) == 0.0
    assert time.monotonic() - t0 < 15
    long = "\\boxed{" + "1+" * ma.MAX_ANSWER_CHARS + "1}"
    assert math_answer(_row(answer=str(ma.MAX_ANSWER_CHARS + 1)), long) == 0.0  # too long to parse


# ---------------------------------------------------------------------- code_tests: without running

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
SUM_TESTS = [
    {"input": "1 2\n", "output": "3\n"},
    {"input": "5 5", "output": "10"},
    {"input": "0 0\n", "output": "0  \n\n"},  # trailing spaces and empty lines do not count
]


@pytest.mark.parametrize(
    "response, program",
    [
        ("```python\nx = 1\n```\nOutput:\n```\n1\n```", "x = 1\n"),  # a later untagged block is output
        ("draft\n```py\nx = 1\n```\nbetter:\n```python\nx = 2\n```", "x = 2\n"),
        ("```\nx = 3\n```", "x = 3\n"),
        ("```bash\nls\n```\n```\nx = 4\n```", "x = 4\n"),
        ("Here:\n```python\nx = 5\nprint(x)", "x = 5\nprint(x)\n"),  # unclosed: to the end
        ("x = 6\nprint(x)", "x = 6\nprint(x)"),  # no fence: all of it
    ],
)
def test_extract_program(response, program):
    assert ct.extract_program(response) == program


def test_tests_are_read_in_every_form_and_bad_ones_name_the_row():
    assert ct.read_tests(_row("code", tests=ADD_TESTS)) == ("assert", ADD_TESTS)
    assert ct.read_tests(_row("code", tests=json.dumps(SUM_TESTS)))[0] == "stdio"
    apps = {"inputs": ["1 2\n", ["3", "4"]], "outputs": ["3\n", 7]}
    assert ct.read_tests(_row("code", tests=apps)) == (
        "stdio",
        [{"input": "1 2\n", "output": "3\n"}, {"input": "3\n4", "output": "7"}],
    )
    with pytest.raises(KeyError, match=r"code prompt 'the question' \(source test, row 7\) has no 'tests'"):
        code_tests(_row("code"), "x = 1")
    for bad in ([], [1, 2], ["assert True", {"input": "", "output": ""}], "{not json"):
        with pytest.raises(ValueError, match=r"\(source test, row 7\)"):
            code_tests(_row("code", tests=bad), "x = 1")
    with pytest.raises(ValueError, match="timeout_s"):
        code_tests(_row("code", tests=ADD_TESTS, timeout_s=0), "x = 1")


def test_sandbox_refusal_scores_zero_and_is_counted(monkeypatch):
    """No kernel layer and no sandbox.allow_unisolated: the program is not run, and one response
    does not stop the run (as exec_match)."""
    monkeypatch.setattr(sandbox, "isolation", lambda: "basic")
    monkeypatch.setattr(sandbox, "_ALLOW_UNISOLATED", False)
    refused = ct.OUTCOMES["error: SandboxUnavailableError"]
    assert code_tests(_row("code", tests=ADD_TESTS), "def add(a, b):\n    return a + b") == 0.0
    assert ct.OUTCOMES["error: SandboxUnavailableError"] == refused + 1


def test_code_tests_executes_and_the_others_do_not():
    row = _row("code", tests=ADD_TESTS)
    assert ct.executes(row) and verifier_executes("code_tests", row)
    assert not any(verifier_executes(s, row) for s in ("math_answer", "tool_call", "exact"))
    assert verifier_executes("mopd.verifiers.code_tests:code_tests", row)  # a built-in named by module


# ---------------------------------------------------------------------- code_tests: running

ADD = {
    "right": ("def add(a, b):\n    return a + b", 1.0),
    "partial": ("def add(a, b):\n    return a + b if a >= 0 else 7", 0.75),
    "wrong": ("def add(a, b):\n    return a - b + 1", 0.0),
    "syntax error": ("def add(a, b) return a + b", 0.0),
    # exit() before the asserts: a harness that judged the exit status would pass all four
    "exit at the top": ("def add(a, b):\n    return a + b\nexit()", 0.0),
    "exit in the function": ("import sys\ndef add(a, b):\n    sys.exit(0)", 0.0),
    "os._exit in one test": ("import os\ndef add(a, b):\n    if a == 0:\n        os._exit(0)\n    return a + b", 0.75),
    "hangs in one test": ("def add(a, b):\n    while a == 0:\n        pass\n    return a + b", 0.75),
    "sleeps in one test": (
        "import time\ndef add(a, b):\n    if a == 0:\n        time.sleep(60)\n    return a + b",
        0.75,
    ),
}


@pytest.mark.parametrize("name", list(ADD))
def test_assert_tests_score_the_fraction_passed(kernel, name):
    program, reward = ADD[name]
    t0 = time.monotonic()
    assert code_tests(_row("code", tests=ADD_TESTS, timeout_s=0.5), f"```python\n{program}\n```") == reward
    assert time.monotonic() - t0 < 15  # a hang costs its own test's limit (0.5 s CPU, 2.5 s wall)


def test_all_assert_tests_run_in_one_process(kernel):
    run = ct.run_tests("def add(a, b):\n    return a + b\n", "assert", ADD_TESTS)
    assert run.passed == {0: True, 1: True, 2: True, 3: True} and run.processes == 1


def test_a_program_that_ignores_the_timers_costs_only_its_own_test(kernel):
    """The timers raise inside the program; one that ignores them (or swallows what they raise)
    is dropped by the harness's watchdog and a new process runs the remaining tests."""
    ignore = (
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nsignal.signal(signal.SIGPROF, signal.SIG_IGN)\n"
        "def add(a, b):\n    while a == 0:\n        pass\n    return a + b\n"
    )
    swallow = "def add(a, b):\n    while a == 0:\n        try:\n            while True:\n                pass\n        except BaseException:\n            pass\n    return a + b\n"  # noqa: E501
    for program in (ignore, swallow):
        t0 = time.monotonic()
        run = ct.run_tests(program, "assert", ADD_TESTS, cpu_s=0.5)
        assert run.passed == {0: True, 1: False, 2: True, 3: True}, run
        assert run.why[1] in ("timeout", "exit 124") and time.monotonic() - t0 < 15


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param("namespaces", marks=pytest.mark.requires("sandbox")),
        pytest.param("bwrap", marks=pytest.mark.requires("bwrap")),
    ],
)
def test_the_harness_works_in_each_kernel_layer(layer, monkeypatch):
    """bwrap shows the harness's main.py at another path and gives its own /dev: same verdicts."""
    monkeypatch.setattr(sandbox, "isolation", lambda: layer)
    hang = "def add(a, b):\n    while a == 0:\n        pass\n    return a + b\n"
    assert ct.run_tests(hang, "assert", ADD_TESTS, cpu_s=0.5).passed == {0: True, 1: False, 2: True, 3: True}
    assert code_tests(_row("code", tests=SUM_TESTS), STDIO["open(0) and exit()"][0]) == 1.0


def test_forged_reports_and_junk_output_count_for_nothing(kernel):
    """The program cannot know the nonce: printed 'pass' lines, on stdout or any descriptor, are ignored."""
    forger = (
        "import os, sys\nprint('PASS\\n' * 100)\nsys.__stdout__.write('pass 0\\npass 1\\n')\n"
        "for fd in range(1, 10):\n    try:\n"
        "        os.write(fd, b'\\nready\\nstart 0\\npass 0 pass 1 pass 2 pass 3\\ndone\\n')\n"
        "    except OSError:\n        pass\n"
        "def add(a, b):\n    return 0\n"
    )
    assert code_tests(_row("code", tests=ADD_TESTS), forger) == 0.5  # add(0, 0) and add(-1, 1) are right


def test_builtins_changed_by_one_test_are_restored_for_the_next(kernel):
    program = "import builtins\nif getattr(builtins, 'seen', False):\n    raise SystemExit(3)\nbuiltins.seen = True\ndef add(a, b):\n    return a + b\n"  # noqa: E501
    assert code_tests(_row("code", tests=ADD_TESTS), program) == 1.0


STDIO = {
    "input()": ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
    "open(0) and exit()": ("a, b = map(int, open(0).read().split())\nprint(a + b)\nexit()", 1.0),
    "buffer and os.write": (
        "import os, sys\na, b = map(int, sys.stdin.buffer.read().split())\nos.write(1, b'%d' % (a + b))",
        1.0,
    ),  # noqa: E501
    "wrong": ("print(3)", 1 / 3),
    "hangs in one test": ("a, b = map(int, input().split())\nwhile a == 5:\n    pass\nprint(a + b)", 2 / 3),
    "exit(1) after the output": ("a, b = map(int, input().split())\nprint(a + b)\nexit(1)", 0.0),
    "crashes": ("print(1 // 0)", 0.0),
}


@pytest.mark.parametrize("name", list(STDIO))
def test_stdin_stdout_tests_score_the_fraction_passed(kernel, name):
    program, reward = STDIO[name]
    row = _row("code", tests=SUM_TESTS, timeout_s=0.5)
    assert code_tests(row, f"```python\n{program}\n```") == pytest.approx(reward)


# ---------------------------------------------------------------------- tool_call

CALLS = [{"name": "weather", "arguments": {"city": "Paris", "days": 3}}, {"name": "time", "arguments": {"tz": "CET"}}]


def _hermes(*calls: tuple[str, object]) -> str:
    return "Let me look.\n" + "\n".join(
        f"<tool_call>{json.dumps({'name': n, 'arguments': a})}</tool_call>" for n, a in calls
    )


@pytest.mark.parametrize(
    "meta, response, reward",
    [
        ({}, _hermes(("weather", {"city": "Paris", "days": 3}), ("time", {"tz": "CET"})), 1.0),
        ({}, _hermes(("weather", {"days": 3, "city": "Paris"}), ("time", {"tz": "CET"})), 1.0),  # key order
        ({}, _hermes(("weather", {"city": "Paris", "days": 3.0}), ("time", {"tz": "CET"})), 1.0),  # 3 == 3.0
        ({}, _hermes(("weather", '{"city": "Paris", "days": 3}'), ("time", {"tz": "CET"})), 1.0),  # JSON string
        ({}, _hermes(("weather", {"city": "Paris", "days": "3"}), ("time", {"tz": "CET"})), 0.0),  # "3" is not 3
        ({}, _hermes(("time", {"tz": "CET"}), ("weather", {"city": "Paris", "days": 3})), 0.0),  # order
        ({"unordered": True}, _hermes(("time", {"tz": "CET"}), ("weather", {"city": "Paris", "days": 3})), 1.0),
        ({}, _hermes(("weather", {"city": "Paris", "days": 3}), ("clock", {"tz": "CET"})), 0.0),  # wrong name
        ({}, _hermes(("weather", {"city": "Paris", "days": 3})), 0.0),  # a call missing
        ({"unordered": True}, _hermes(*[("time", {"tz": "CET"}), ("weather", {"city": "Paris", "days": 3})] * 2), 0.0),
        ({}, _hermes(("weather", {"city": "Paris", "days": 3}), ("time", {"tz": "CET"}), ("time", {})), 0.0),  # extra
        ({}, _hermes(("weather", {"city": "Paris", "days": 3}), ("time", {"tz": "CET", "x": None})), 0.0),
        ({}, _hermes(("weather", {"city": "Paris", "days": 3})) + "<tool_call>{broken</tool_call>", 0.0),
        ({}, "The weather in Paris is sunny.", 0.0),
    ],
)
def test_tool_call(meta, response, reward):
    assert tool_call(_row("agent", calls=CALLS, **meta), response) == reward


def test_tool_call_expected_forms_and_errors():
    row = _row("agent", calls=[{"name": "ping", "arguments": '{"n": 1}'}, {"name": "stop"}])
    assert tool_call(row, _hermes(("ping", {"n": 1.0}), ("stop", {}))) == 1.0
    assert tool_call(_row("agent", calls=[]), "no call") == 1.0
    assert tool_call(_row("agent", calls=[]), _hermes(("ping", {}))) == 0.0
    simple = _row("agent", calls=[{"name": "add", "arguments": {"a": "1", "b": "2"}}], parser="simple")
    simple.meta["tools"] = [
        {"type": "function", "function": {"name": "add", "parameters": {"properties": {"a": {}, "b": {}}}}}
    ]
    assert tool_call(simple, "[add(1,2)]") == 1.0
    assert canonical(True) != canonical(1) and canonical([1, 2]) != canonical([2, 1])
    with pytest.raises(KeyError, match=r"row 7\) has no 'calls'"):
        tool_call(_row("agent"), "x")
    for bad in (
        {"name": "x"},
        [{"arguments": {}}],
        [{"name": "x", "arguments": "{oops"}],
        [{"name": "x", "arguments": [1]}],
    ):
        with pytest.raises(ValueError, match=r"\(source test, row 7\)"):
            tool_call(_row("agent", calls=bad), "x")


# ---------------------------------------------------------------------- resolving


def judge(row: PromptRow, response: str) -> float:
    """A module:function verifier for the tests below."""
    return 0.5


def runs_code(row: PromptRow, response: str) -> float:
    return 1.0


runs_code.executes = lambda row: row.meta.get("lang") == "py"  # type: ignore[attr-defined]
NOT_A_FUNCTION = 3


def test_resolve_builtins_and_module_functions():
    assert set(BUILTIN_VERIFIERS) == {"math_answer", "code_tests", "tool_call", "exact"}
    assert resolve_verifier("math_answer") is math_answer and resolve_verifier("code_tests") is code_tests
    assert resolve_verifier("exact")(_row(answer="hi"), " hi\n") == exact_match(_row(answer="hi"), " hi\n") == 1.0
    assert resolve_verifier("mopd.domains.common:exact_match") is exact_match
    assert resolve_verifier("test_verifiers:judge")(_row(), "x") == 0.5
    assert resolve_verifier("mopd.verifiers:VerifierPool.close") is VerifierPool.close  # dotted: Class.method
    assert verifier_executes("test_verifiers:runs_code", _row(lang="py"))
    assert not verifier_executes("test_verifiers:runs_code", _row(lang="c"))
    assert not verifier_executes("test_verifiers:judge", _row())


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("maths", ValueError, r"unknown verifier 'maths'; built-in: math_answer, code_tests, tool_call, exact; or"),
        ("", ValueError, r"expected a name \(built-in: math_answer"),
        (
            "no_such_module_xyz:f",
            ImportError,
            r"verifier 'no_such_module_xyz:f': cannot import module 'no_such_mod.*PYTHONPATH",
        ),  # noqa: E501
        ("test_verifiers:nope", ImportError, r"module 'test_verifiers' has no 'nope'; check the name after ':'"),
        ("test_verifiers:NOT_A_FUNCTION", ValueError, r"'NOT_A_FUNCTION' is a int, not a function \(row, response\)"),
        (":judge", ValueError, r"expected 'package.module:function'"),
        ("test_verifiers:", ValueError, r"expected 'package.module:function'"),
        ("a:b:c", ValueError, r"one colon"),
    ],
)
def test_bad_specs_say_what_to_fix(spec, error, message):
    with pytest.raises(error, match=message):
        resolve_verifier(spec)


# ---------------------------------------------------------------------- verify_batch


def _mixed_batch() -> tuple[list[str], list[PromptRow], list[str]]:
    """Math, tool and exact rows (no code: runs anywhere), right and wrong answers."""
    specs, rows, responses = [], [], []
    for gold, response, _ in MATH_PAIRS[:24]:
        specs.append("math_answer"), rows.append(_row(answer=gold)), responses.append(response)
    for k in range(6):
        call = {"name": "f", "arguments": {"k": k}}
        specs.append("tool_call"), rows.append(_row("agent", calls=[call]))
        responses.append(_hermes(("f", {"k": k if k % 2 else k + 1})))
        specs.append("exact"), rows.append(_row("x", answer=str(k))), responses.append(str(k % 3))
    return specs, rows, responses


def _serial(specs, rows, responses) -> list[float]:
    return [resolve_verifier(s)(r, x) for s, r, x in zip(specs, rows, responses, strict=True)]


def test_verify_batch_equals_serial():
    specs, rows, responses = _mixed_batch()
    serial = _serial(specs, rows, responses)
    assert 0 < sum(serial) < len(serial)
    assert verify_batch(specs, rows, responses, workers=3) == serial
    assert verify_batch("exact", [_row(answer="5"), _row(answer="x")], ["5", "y"]) == [1.0, 0.0]  # one spec for all


def test_verify_batch_math_in_processes_equals_serial():
    specs, rows, responses = _mixed_batch()
    specs, rows, responses = specs[:12], rows[:12], responses[:12]
    before = ma.OUTCOMES["equal"]
    assert verify_batch(specs, rows, responses, processes=2) == _serial(specs, rows, responses)
    assert ma.OUTCOMES["equal"] > before  # counted on the caller, not lost in the workers
    with pytest.raises(KeyError, match="has no 'answer'"):  # found on the caller, raised with the batch
        verify_batch("math_answer", [_row(answer="1"), _row()], ["1", "1"], processes=2)


def test_verify_batch_with_code_equals_serial(kernel):
    programs = [ADD[k][0] for k in ("right", "partial", "wrong", "exit at the top")] + [STDIO["input()"][0]]
    rows = [_row("code", tests=ADD_TESTS)] * 4 + [_row("code", tests=SUM_TESTS)]
    specs, more_rows, more_responses = _mixed_batch()
    specs = ["code_tests"] * 5 + specs[:6]
    rows, responses = rows + more_rows[:6], programs + more_responses[:6]
    with VerifierPool(workers=3) as pool:
        assert pool.verify(specs, rows, responses) == _serial(specs, rows, responses)
        assert pool.verify(specs, rows, responses)[:5] == [1.0, 0.75, 0.0, 0.0, 1.0]  # the pool is reusable


def flaky(row: PromptRow, response: str) -> float:
    if response == "boom":
        raise RuntimeError("judge unreachable")
    return 1.0


def test_verify_batch_errors():
    """A verifier that raises: by default raised once the batch is done; with on_error='zero' it
    scores 0.0, counted by spec; a row without its field (a data bug) is raised either way."""
    rows, responses = [_row(), _row(), _row()], ["ok", "boom", "ok"]
    with pytest.raises(RuntimeError, match="judge unreachable"):
        verify_batch("test_verifiers:flaky", rows, responses)
    before = ERRORS["test_verifiers:flaky"]
    assert verify_batch("test_verifiers:flaky", rows, responses, on_error="zero") == [1.0, 0.0, 1.0]
    assert ERRORS["test_verifiers:flaky"] == before + 1
    with pytest.raises(KeyError, match="has no 'answer'"):
        verify_batch(["exact", "math_answer"], [_row(answer="a"), _row()], ["a", "1"], on_error="zero")
    with pytest.raises(ValueError, match="unknown verifier 'nope'"):
        verify_batch(["exact", "nope"], [_row(answer="a")] * 2, ["a", "a"])
    with pytest.raises(ValueError, match="2 verifier specs for 1 rows"):
        verify_batch(["exact", "exact"], [_row(answer="a")], ["a"])
