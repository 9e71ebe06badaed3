"""Tool wall time of a rollout step whose trajectories call a slow tool: the environment pool
(mopd/dist/env_pool.py) runs every trajectory's calls as soon as its turn ends, so 32 trajectories
of 3 turns of a 1 s tool take about 3 s, not 32 x 3 = 96 s.

No model: each trajectory's "turn" is one call of ``sleep`` submitted the moment its previous
result arrives (what a rollout does once its generation is done), then a final answer. Reported:
``wall_s`` (first call to last result), ``serial_s`` (the calls' latencies summed: one at a time),
and, with ``--jitter`` (each call sleeps ``sleep`` +- jitter, drawn per call), the two bounds:
``lockstep_s`` (each turn waits for the slowest trajectory of that turn) and ``ideal_s`` (the
slowest trajectory alone), which trajectories that do not wait for each other approach.

    OMP_NUM_THREADS=1 python benchmarks/env_pool.py                       # Ray workers
    OMP_NUM_THREADS=1 python benchmarks/env_pool.py --local               # in-process pool
    OMP_NUM_THREADS=1 python benchmarks/env_pool.py --jitter 0.5 --out results/env_pool.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import time
from typing import Any

import _bench
from mopd.dist.env_pool import EnvPool, summarize
from mopd.envs import Env, ParsedCall
from mopd.types import PromptRow


class SleepEnv(Env):
    """One tool, ``sleep(seconds)``; a final answer scores 1."""

    def tool_sleep(self, seconds: str) -> str:
        time.sleep(float(seconds))
        return "slept " + seconds

    def reward(self, content: str) -> float | None:
        return 1.0


def plan(args: argparse.Namespace) -> list[list[float]]:
    """Seconds of every call: ``plan[trajectory][turn]``."""
    rng = random.Random(args.seed)
    return [
        [args.sleep + rng.uniform(-args.jitter, args.jitter) for _ in range(args.turns)]
        for _ in range(args.trajectories)
    ]


def drive(pool: EnvPool, sleeps: list[list[float]]) -> dict[str, Any]:
    """Run every trajectory's turns, each submitted as soon as its previous result is in."""
    eps = [f.result() for f in [pool.open(PromptRow(f"task {i}", "bench")) for i in range(len(sleeps))]]
    turn = {ep.id: 0 for ep in eps}
    plan_of = {ep.id: s for ep, s in zip(eps, sleeps, strict=True)}

    def submit(tid: str) -> concurrent.futures.Future:
        k = turn[tid]
        calls = [ParsedCall("sleep", {"seconds": f"{plan_of[tid][k]:.3f}"})] if k < len(plan_of[tid]) else []
        return pool.step(tid, calls, "" if calls else "answer")

    start = time.monotonic()
    pending = {submit(ep.id): ep.id for ep in eps}
    while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for fut in done:
            tid = pending.pop(fut)
            res = fut.result()
            turn[tid] += 1
            if not res.done:
                pending[submit(tid)] = tid
    wall = time.monotonic() - start
    stats = [pool.close(ep.id) for ep in eps]
    return {"wall_s": wall, "serial_s": sum(s.tool_latency_s for s in stats), "metrics": summarize(stats, "bench")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trajectories", type=int, default=32)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--sleep", type=float, default=1.0, help="seconds per tool call")
    p.add_argument("--jitter", type=float, default=0.0, help="each call sleeps sleep +- jitter")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-concurrent", type=int, default=64)
    p.add_argument("--local", action="store_true", help="in-process workers instead of Ray actors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if not args.local:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.monotonic()
    pool = EnvPool(
        SleepEnv,
        workers=args.workers,
        max_concurrent=args.max_concurrent,
        timeout_s=10 * args.sleep + 10,
        local=args.local,
    )
    startup = time.monotonic() - t0
    sleeps = plan(args)
    try:
        result = drive(pool, sleeps)
    finally:
        pool.shutdown()
    result.update(
        mode="local" if args.local else f"ray, {args.workers} workers",
        trajectories=args.trajectories,
        turns=args.turns,
        sleep_s=args.sleep,
        jitter_s=args.jitter,
        pool_start_s=startup,
        lockstep_s=sum(max(s[k] for s in sleeps) for k in range(args.turns)),
        ideal_s=max(sum(s) for s in sleeps),
        machine=_bench.machine(),
    )
    print(
        f"{args.trajectories} trajectories x {args.turns} tool turns of {args.sleep:g}s (+-{args.jitter:g}), "
        f"{result['mode']}: tool wall time {result['wall_s']:.2f}s (serial: {result['serial_s']:.1f}s; "
        f"lockstep bound {result['lockstep_s']:.2f}s, ideal {result['ideal_s']:.2f}s; pool start {startup:.1f}s)"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, default=str))
    _bench.write_json(args.out, result)


if __name__ == "__main__":
    main()
