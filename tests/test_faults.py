"""Actor failures in a real run (recipes/tiny.yaml, a local Ray in this process, trainer world size 2):
a teacher and a rollout actor killed mid-step are restarted by Ray and the step is retried; a rollout
actor restarted between steps gets the current weights back; a trainer rank killed mid-step stops
the run with a message pointing at ``--resume``, which then completes it. One run covers all of
these (Ray and actor start-up dominate the cost); skipped bad data rows are counted in its metrics.

    OMP_NUM_THREADS=1 pytest tests/test_faults.py
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from mopd import checkpoint as ckpt
from mopd.config import load_config
from mopd.metrics import read_metrics

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
pytestmark = pytest.mark.slow

BAD_ROWS = ['{"prompt": "1+1=",', {"prompt": ""}, {"prompt": "x", "domain": "law"}, {"prompt": "9" * 300}]


def kill_during(obj, method: str, actor, after_s: float = 0.3) -> None:
    """Make the next ``obj.method(...)`` lose ``actor`` mid-call: the actor is kept busy so the
    call queues behind, then killed (Ray restarts it if it may)."""
    import ray

    real = getattr(obj, method)

    def call(*args, **kwargs):
        setattr(obj, method, real)  # once
        actor.__ray_call__.remote(lambda self: time.sleep(60))
        threading.Timer(after_s, lambda: ray.kill(actor, no_restart=False)).start()
        return real(*args, **kwargs)

    setattr(obj, method, call)


def kill_and_wait_restarted(actor) -> None:
    """Kill ``actor`` between steps and wait until Ray has restarted it: the pool is not told."""
    import ray
    from ray.exceptions import ActorUnavailableError

    ray.kill(actor, no_restart=False)
    time.sleep(0.5)
    for _ in range(600):
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=60)
            return
        except ActorUnavailableError:
            time.sleep(0.2)


FAULTS = {  # step -> what happens to it
    2: lambda loop: kill_during(loop.teachers, "score", loop.teachers._workers["math"][0]),
    3: lambda loop: kill_during(loop.rollout, "generate", loop.rollout._actors[0]),
    4: lambda loop: kill_and_wait_restarted(loop.rollout._actors[0]),  # before the step
    5: lambda loop: kill_during(loop.trainer, "train_step", loop.trainer._actors[1]),  # not restarted
}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """Six steps, checkpoints at 2 and 4, with the FAULTS above; then ``--resume``."""
    ray = pytest.importorskip("ray")
    from mopd.loop import MOPDLoop, RunStoppedError, run_training

    out = tmp_path_factory.mktemp("faults")
    data = out / "math.jsonl"
    good = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in good + BAD_ROWS))
    cfg = load_config(TINY, [
        f"run.output_dir={out}", "run.total_steps=6", "checkpoint.every=2", "trainer.world_size=2",
        "data.on_bad_row=skip", f"data.sources=[{{domain: math, path: '{data}'}}, {{domain: code, generator: code}}]",
    ])  # fmt: skip
    real_step, seen = MOPDLoop.train_one_step, []

    def faulty_step(loop):
        fault = FAULTS.get(loop.step + 1)
        if fault and loop.step + 1 not in seen:
            seen.append(loop.step + 1)
            fault(loop)
        return real_step(loop)

    logs = Records()
    logging.getLogger("mopd").addHandler(logs)
    result = {"out": out}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MOPDLoop, "train_one_step", faulty_step)
            with pytest.raises(RunStoppedError) as stopped:
                run_training(cfg)
            result["error"] = str(stopped.value)
            result["after_stop"] = read_metrics(out / "metrics.jsonl")
            result["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
            run_training(cfg, resume=True)
    finally:
        logging.getLogger("mopd").removeHandler(logs)
        ray.shutdown()
    result["logs"] = logs.messages
    result["metrics"] = read_metrics(out / "metrics.jsonl")
    return result


def train_records(records):
    return [r for r in records if "train/loss" in r]


def test_killed_teacher_and_rollout_actors_are_restarted_and_the_step_retried(faulty_run):
    records = train_records(faulty_run["metrics"])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], "a step was lost or repeated"
    assert [r["policy_version"] for r in records] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # The restarted rollout actor came back with the initial weights: the pool re-sent the current
    # ones before retrying, so every batch was sampled by the policy of the step before ...
    assert [r["rollout/policy_version"] for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # ... and the rollout's log-probs equal the trainer's (stale weights would differ by ~1e-1).
    assert all(r["train/train_rollout_abs_diff"] < 1e-4 for r in records)
    by_step = {r["step"]: r for r in records}
    assert "faults/teacher_restarts" not in by_step[1] and by_step[2]["faults/teacher_restarts"] == 1.0
    assert by_step[3]["faults/rollout_restarts"] == 1.0  # killed mid-call
    assert by_step[4]["faults/rollout_restarts"] == 2.0  # restarted between steps, found by its version
    logs = "\n".join(faulty_run["logs"])
    assert "teacher actor died" in logs and "teacher actor restarted" in logs
    assert "rollout actor died" in logs and "answered with policy version 0, expected 3" in logs


def test_killed_trainer_rank_stops_the_run_with_a_resume_hint(faulty_run):
    error = faulty_run["error"]
    assert "trainer rank 1 died during train_step" in error
    assert "checkpoint step 4" in error and "--resume" in error
    # Nothing of the failed step was written: no metrics, no checkpoint (complete or partial).
    assert [r["step"] for r in train_records(faulty_run["after_stop"])] == [1, 2, 3, 4]
    assert faulty_run["checkpoints"] == ["step_000002", "step_000004"]
    # --resume then finished the run (checked step by step above) from that checkpoint.
    assert ckpt.latest_checkpoint(faulty_run["out"] / "checkpoints").name == "step_000006"


def test_skipped_bad_rows_are_counted_in_the_metrics(faulty_run):
    first = faulty_run["metrics"][0]
    assert first["step"] == 0
    for kind in ("malformed_json", "empty_prompt", "unknown_domain", "prompt_too_long"):
        assert first[f"data/skipped/{kind}"] == 1, kind
