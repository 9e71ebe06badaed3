"""A run's start-up with and without Ray's prestarted idle workers: `mopd train` of recipes/tiny.yaml
with the multi-turn agent layer and two trainer ranks (the tests' reference run: 7 actors), timed
from the command's start to its exit, and the pools' start as the run logs it ("pools started in").

``prestart``: Ray's default, idle workers started ahead for the job (none of which an actor of a
run uses: each actor sets its own environment); ``no prestart``: what `mopd train`'s local Ray does
(mopd.dist.runtime.local_ray_kwargs). The two alternate, round after round, so drift in the
machine's load falls on both.

    OMP_NUM_THREADS=1 python benchmarks/startup.py --rounds 3     # ~7 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    str(ROOT / "recipes" / "tiny.yaml"), "trainer.world_size=2", "trainer.zero_stage=2",
    str(ROOT / "tests" / "layers" / "agent.yaml"), f"run.plugins=[{ROOT / 'tests' / 'layers' / 'calls_every_turn.py'}]",
    "checkpoint.every=0",
]  # fmt: skip

# Runs `mopd train` in a fresh interpreter; with "prestart" Ray's default comes back.
DRIVER = """
import sys
import mopd.dist.runtime as rt
if sys.argv[1] == "prestart":
    plain = rt.local_ray_kwargs
    def with_prestart(cfg, num_cpus):
        kw = plain(cfg, num_cpus)
        kw.pop("_system_config")
        return kw
    rt.local_ray_kwargs = with_prestart
from mopd.app.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def one_run(setting: str, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, setting, *ARGS, f"run.output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: mopd train failed:\n{proc.stderr[-3000:]}")
    pools = re.search(r"pools started in ([\d.]+) s", proc.stderr)
    return {"total_s": total, "pools_s": float(pools[1]) if pools else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the measurements as JSON here")
    args = ap.parse_args(argv)
    settings = ("prestart", "no prestart")
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="mopd-startup-") as tmp:
        for r in range(args.rounds):
            for s in settings if r % 2 == 0 else settings[::-1]:
                m = one_run(s, Path(tmp) / f"{s.replace(' ', '_')}_{r}")
                runs[s].append(m)
                print(f"round {r + 1}, {s}: {m['total_s']:.1f} s (pools {m['pools_s']:.1f} s)", flush=True)
    print("\n| setting | command s, mean (min) | pools s, mean (min) |\n|---|---|---|")
    for s in settings:
        tot, pools = [m["total_s"] for m in runs[s]], [m["pools_s"] for m in runs[s]]
        mean_min = [f"{statistics.mean(x):.1f} ({min(x):.1f})" for x in (tot, pools)]
        print(f"| {s} | {mean_min[0]} | {mean_min[1]} |")
    ratio = statistics.mean(m["total_s"] for m in runs["no prestart"]) / statistics.mean(
        m["total_s"] for m in runs["prestart"]
    )
    print(f"\nno prestart / prestart, command time: {ratio:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": runs, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
