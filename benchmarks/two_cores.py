"""What two single-thread processes cost each other on this machine: a compute-bound kernel (a
512 x 512 matmul, in cache) and a memory-bound one (summing a 64 MB tensor), each timed alone and
then as two copies at once. ``rollout.overlap`` runs the rollout and the trainer side by side like
that; this separates what the cores and memory cost each other from what a run adds on top (the
driver, Ray, more actors than cores). Figures in docs/benchmarks.md.

    OMP_NUM_THREADS=1 python benchmarks/two_cores.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def kernel(kind: str, repeats: int) -> float:
    """Seconds for ``repeats`` calls of the kernel, one torch thread."""
    torch.set_num_threads(1)
    if kind == "compute":
        a, b = torch.randn(512, 512), torch.randn(512, 512)

        def call():
            return a @ b
    else:
        x = torch.randn(16_000_000)  # 64 MB, twice the L3 cache of the 2-core machine

        def call():
            return x.sum()

    call()
    t0 = time.perf_counter()
    for _ in range(repeats):
        call()
    return time.perf_counter() - t0


def timed_copies(kind: str, repeats: int, copies: int) -> list[float]:
    """Run ``copies`` child processes of the kernel at once; each one's own time."""
    cmd = [sys.executable, __file__, "--child", kind, "--repeats", str(repeats)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    return [float(p.communicate()[0]) for p in procs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=("compute", "memory"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(kernel(args.child, args.repeats))
        return
    res = {}
    for kind in ("compute", "memory"):
        alone, together = [], []
        for _ in range(args.rounds):  # alternating, so drift in the machine's load hits both
            alone += timed_copies(kind, args.repeats, 1)
            together += timed_copies(kind, args.repeats, 2)
        a, t = statistics.median(alone), statistics.median(together)
        res[kind] = {"alone_s": alone, "together_s": together, "slowdown": t / a}
        print(
            f"{kind}: alone {a:.3f} s (min {min(alone):.3f}), two at once {t:.3f} s each (min {min(together):.3f}), "
            f"medians of {args.rounds} rounds: {t / a:.2f}x"
        )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
