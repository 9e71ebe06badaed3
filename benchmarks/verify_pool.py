"""Verifying a batch of real-data rows one at a time on the caller vs with ``verify_batch``
(mopd/verifiers/): 256 ``code_tests`` rows, each a program (right, partly right or wrong; made
here) against a few tests in the sandbox. Both in the same run, on the same rows, with the same
scores (checked); reported as measured seconds and their ratio.

With ``--math``, also 256 ``math_answer`` rows one at a time vs in a process pool of
``--processes`` (started and warmed before the clock starts, as a run's ``VerifierPool`` would be):
the measurement behind the pool's default of checking math answers on the caller.

    OMP_NUM_THREADS=1 python benchmarks/verify_pool.py
    OMP_NUM_THREADS=1 python benchmarks/verify_pool.py --workers 4 --math --out results/verify_pool.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import _bench
from mopd import sandbox
from mopd.types import PromptRow
from mopd.verifiers import VerifierPool, code_tests, default_workers, math_answer, verify_batch

ASSERTS = [
    "assert f({a}, {b}) == {c}",
    "assert f({b}, {a}) == {c}",
    "assert f(0, {a}) == {a}",
    "assert f({a}, 0) == {a}",
]
# (body of f, its share of the rows): right, right only when an argument is 0, wrong.
PROGRAMS = [("return a + b", 0.5), ("return a + b if 0 in (a, b) else a * b", 0.25), ("return a - b", 0.25)]
STDIO_PROGRAM = "a, b = map(int, input().split())\nprint({expr})\n"


def code_rows(n: int, seed: int) -> tuple[list[PromptRow], list[str]]:
    """``n`` rows, half assert-style (4 tests), half stdin/stdout (3 tests), and a response to each."""
    rng = random.Random(seed)
    rows, responses = [], []
    for i in range(n):
        body = rng.choices([p for p, _ in PROGRAMS], [w for _, w in PROGRAMS])[0]
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if i % 2 == 0:
            tests: list[Any] = [t.format(a=a, b=b, c=a + b) for t in ASSERTS]
            program = f"def f(a, b):\n    {body}\n"
        else:
            pairs = [(a, b), (b, a), (a, 0)]
            tests = [{"input": f"{x} {y}\n", "output": f"{x + y}\n"} for x, y in pairs]
            program = STDIO_PROGRAM.format(expr=body.removeprefix("return ").replace("a + b", "(a + b)"))
        rows.append(PromptRow(f"add {i}", "code", meta={"tests": tests}, source="bench", index=i))
        responses.append(f"Here is my solution.\n```python\n{program}```\n")
    return rows, responses


def math_rows(n: int, seed: int) -> tuple[list[PromptRow], list[str]]:
    """``n`` math rows in four gold/answer styles (GSM8K, fractions, plain, intervals), a quarter wrong."""
    rng = random.Random(seed)
    rows, responses = [], []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        gold, response = [
            (f"#### {a * 1000 + b:,}", f"So the total is {a * 1000 + b}.\n#### {a * 1000 + b:,}"),
            (f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", f"We get \\boxed{{\\dfrac{{{a}}}{{{b}}}}}"),
            (f"{a}", f"The answer is ${a + 1}$."),
            (f"\\boxed{{({a}, {a + b}]}}", f"The set is $\\boxed{{\\left({a}, {a + b}\\right]}}$"),
        ][i % 4]
        rows.append(PromptRow(f"q {i}", "math", meta={"answer": gold}, source="bench", index=i))
        responses.append(response)
    return rows, responses


def timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_code(args: argparse.Namespace) -> dict[str, Any]:
    rows, responses = code_rows(args.rows, args.seed)
    serial_s, serial = timed(lambda: [code_tests(r, x) for r, x in zip(rows, responses, strict=True)])
    batch_s, batch = timed(lambda: verify_batch("code_tests", rows, responses, workers=args.workers))
    assert batch == serial, "verify_batch scored differently from one at a time"
    tests = sum(len(r.meta["tests"]) for r in rows)
    return {
        "rows": len(rows),
        "tests": tests,
        "mean_reward": sum(serial) / len(serial),
        "serial_s": serial_s,
        "batch_s": batch_s,
        "speedup": serial_s / batch_s,
        "workers": args.workers,
    }


def bench_math(args: argparse.Namespace) -> dict[str, Any]:
    warm_rows, warm_responses = math_rows(8, args.seed + 1)
    [math_answer(r, x) for r, x in zip(warm_rows, warm_responses, strict=True)]  # sympy loaded here too
    rows, responses = math_rows(args.rows, args.seed)
    serial_s, serial = timed(lambda: [math_answer(r, x) for r, x in zip(rows, responses, strict=True)])
    with VerifierPool(processes=args.processes) as pool:
        start_s, _ = timed(lambda: pool.verify("math_answer", warm_rows, warm_responses))
        rows, responses = math_rows(args.rows, args.seed + 2)  # answers new to the workers' caches too
        again_s, again = timed(lambda: [math_answer(r, x) for r, x in zip(rows, responses, strict=True)])
        pool_s, pooled = timed(lambda: pool.verify("math_answer", rows, responses))
    assert pooled == again, "the process pool scored differently from one at a time"
    return {
        "rows": len(rows),
        "serial_s": serial_s,
        "serial_again_s": again_s,
        "processes": args.processes,
        "pool_start_s": start_s,
        "pool_s": pool_s,
        "speedup": again_s / pool_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--workers", type=int, default=default_workers(), help="verify_batch threads")
    p.add_argument("--math", action="store_true", help="also math_answer: one at a time vs a process pool")
    p.add_argument("--processes", type=int, default=2, help="process pool size of --math")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    layer = sandbox.isolation()
    if layer == "basic":
        raise SystemExit(sandbox.unisolated_message())
    sandbox.run_untrusted("print(1)")  # the first run pays for the probes: not part of either figure
    result: dict[str, Any] = {"sandbox": layer, "code_tests": bench_code(args)}
    c = result["code_tests"]
    print(
        f"{c['rows']} code_tests rows ({c['tests']} tests, mean reward {c['mean_reward']:.3f}), sandbox {layer}: "
        f"one at a time {c['serial_s']:.2f}s, verify_batch ({c['workers']} threads) {c['batch_s']:.2f}s: "
        f"{c['speedup']:.2f}x"
    )
    if args.math:
        m = result["math_answer"] = bench_math(args)
        print(
            f"{m['rows']} math_answer rows: one at a time {m['serial_s']:.2f}s (again {m['serial_again_s']:.2f}s), "
            f"{m['processes']} processes {m['pool_s']:.2f}s (+{m['pool_start_s']:.2f}s to start): {m['speedup']:.2f}x"
        )
    result["machine"] = _bench.machine()
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, default=str))
    _bench.write_json(args.out, result)


if __name__ == "__main__":
    main()
