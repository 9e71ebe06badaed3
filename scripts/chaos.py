"""Load and faults at once: `recipes/tiny.yaml` for N steps with two rollout replicas and two
replicas of each teacher, once undisturbed and once while a seeded schedule kills rollout and
teacher actors at random moments; prints what survived and what it cost, and whether the two runs
ended with the same weights.

    OMP_NUM_THREADS=1 python scripts/chaos.py --steps 24 --kills 6 --seed 0

Each kill falls at a step drawn from 2..N, a delay into that step drawn from the undisturbed run's
mean step time (so it lands in generate, scoring, training, weight sync, an evaluation or a
restart, wherever that falls), and picks a rollout or teacher actor at random (Ray restarts it, up
to ``ray.max_restarts``). Trainer ranks are not killed: a dead rank stops the run by design
(tests/test_faults.py covers that).
tests/test_chaos.py asserts on the result of ``run_pair``.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
LOAD = [  # two replicas of everything that Ray may restart, an evaluation now and then
    "rollout.replicas=2", "teachers.math.replicas=2", "teachers.code.replicas=2",
    "eval.every=8", "eval.num_prompts=8", "trainer.world_size=1",
]  # fmt: skip


@dataclass
class Outcome:
    loop_s: float  # the training loop's time, from its first step to its end (start-up excluded)
    steps: list[int]
    policy_versions: list[float]
    rollout_policy_versions: list[float]
    restarts: dict[str, float]  # kind -> restarts the pools saw
    weights: dict[str, Any]
    kill_log: list[str] = field(default_factory=list)


@dataclass
class PairResult:
    kills_done: int
    restarts_seen: int
    time_lost_s: float  # loop time with kills minus without
    steps: list[int]
    policy_versions: list[float]
    rollout_policy_versions: list[float]
    weights: dict[str, Any]
    reference_weights: dict[str, Any]
    kill_log: list[str]
    reference_loop_s: float
    loop_s: float


class Killer(threading.Thread):
    """At each ``(step, delay_s)`` of ``plan``, ``delay_s`` seconds into that step (1-based, as
    it runs, whatever it is doing then: generate, score, train, sync, evaluate), kills a random
    rollout or teacher actor; until the loop ends."""

    def __init__(self, plan: list[tuple[int, float]], seed: int) -> None:
        super().__init__(daemon=True)
        self.plan, self.rng = sorted(plan), random.Random(seed)
        self.loop: Any = None
        self.started = threading.Event()
        self.finished = threading.Event()
        self.log: list[str] = []

    def attach(self, loop: Any) -> None:
        self.loop = loop
        self.t0 = time.monotonic()
        self.started.set()

    def _wait_for_step(self, step: int) -> float | None:
        """When step ``step`` began (monotonic), or None if the loop ended first."""
        while self.loop.step + 1 < step:
            if self.finished.wait(0.02):
                return None
        return time.monotonic()

    def run(self) -> None:
        import ray

        self.started.wait()
        for step, delay in self.plan:
            began = self._wait_for_step(step)
            if began is None or self.finished.wait(max(0.0, began + delay - time.monotonic())):
                return
            kind, group = self.rng.choice(
                [("rollout", self.loop.rollout._actors), ("teacher", self.loop.teachers._actors)]
            )
            i = self.rng.randrange(len(group))
            ray.kill(group[i], no_restart=False)
            self.log.append(f"{time.monotonic() - self.t0:6.1f}s step {self.loop.step + 1}: killed {kind} actor {i}")


def run_once(out: Path, steps: int, killer: Killer | None = None) -> Outcome:
    """One run of the tiny recipe under ``LOAD`` (in this process, a local Ray), with ``killer``
    attached to its loop if given."""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from mopd.app.run import run_training
    from mopd.config import load_config
    from mopd.loop import MOPDLoop
    from mopd.metrics import read_metrics

    run_args = [f"run.output_dir={out}", f"run.total_steps={steps}", f"checkpoint.every={steps}"]
    cfg = load_config(TINY, [*run_args, "ray.max_restarts=20", *LOAD])
    real_run, span = MOPDLoop.run, [0.0, 0.0]

    def run(loop: MOPDLoop) -> None:
        span[0] = time.monotonic()
        if killer is not None:
            killer.attach(loop)
        try:
            real_run(loop)
        finally:
            span[1] = time.monotonic()
            if killer is not None:
                killer.finished.set()

    MOPDLoop.run = run  # type: ignore[method-assign]
    if killer is not None:
        killer.start()
    try:
        run_training(cfg)
    finally:
        MOPDLoop.run = real_run  # type: ignore[method-assign]
        ray.shutdown()
    train = [r for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    last = train[-1] if train else {}
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / f"step_{steps:06d}" / "hf")
    return Outcome(
        loop_s=span[1] - span[0],
        steps=[int(r["step"]) for r in train],
        policy_versions=[r["policy_version"] for r in train],
        rollout_policy_versions=[r["rollout/policy_version"] for r in train],
        restarts={k: float(last.get(f"faults/{k}_restarts", 0.0)) for k in ("rollout", "teacher")},
        weights={k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)},
        kill_log=[] if killer is None else killer.log,
    )


def run_pair(tmp: Path, steps: int = 24, kills: int = 6, seed: int = 0) -> PairResult:
    """The undisturbed run, then the same run with ``kills`` kills: each at a step drawn (with
    ``seed``) from 2..steps, a delay into it drawn from the undisturbed run's mean step time."""
    ref = run_once(tmp / "undisturbed", steps)
    rng = random.Random(seed)
    plan = [(rng.randint(2, steps), rng.uniform(0.0, ref.loop_s / steps)) for _ in range(kills)]
    killer = Killer(plan, seed)
    hit = run_once(tmp / "killed", steps, killer)
    return PairResult(
        kills_done=len(hit.kill_log),
        restarts_seen=int(sum(hit.restarts.values())),
        time_lost_s=hit.loop_s - ref.loop_s,
        steps=hit.steps,
        policy_versions=hit.policy_versions,
        rollout_policy_versions=hit.rollout_policy_versions,
        weights=hit.weights,
        reference_weights=ref.weights,
        kill_log=hit.kill_log,
        reference_loop_s=ref.loop_s,
        loop_s=hit.loop_s,
    )


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        r = run_pair(Path(tmp), args.steps, args.kills, args.seed)
    diff = max((r.weights[k] - v).abs().max().item() for k, v in r.reference_weights.items())
    print("\n".join(r.kill_log))
    print(f"kills {r.kills_done}, restarts the pools saw {r.restarts_seen}")
    print(f"steps {len(r.steps)} of {args.steps}, each once: {r.steps == list(range(1, args.steps + 1))}")
    print(f"training loop: undisturbed {r.reference_loop_s:.1f} s, with kills {r.loop_s:.1f} s", end="")
    print(f", lost {r.time_lost_s:.1f} s")
    print(f"max |weight difference| against the undisturbed run: {diff:.2e}")
    return 0 if r.steps == list(range(1, args.steps + 1)) and diff <= 1e-6 else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
