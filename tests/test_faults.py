"""Actor failures in a real run (recipes/tiny.yaml with the multi-turn agent domain of
tests/layers/agent.yaml, trainer world size 2, a local Ray in this process): a teacher and a
rollout actor (with the tool-environment workers it owns) killed mid-step are restarted by Ray and
the step retried; a rollout actor restarted between steps gets the current weights back; a trainer
rank killed mid-step stops the run with a message pointing at ``--resume``, the last checkpoint
intact. One run covers all of these, since Ray and actor start-up dominate the cost; that
``--resume`` then completes a run with the weights of the uninterrupted one is
tests/test_train_e2e.py's SIGKILL test.

    OMP_NUM_THREADS=1 pytest tests/test_faults.py
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from conftest import REFERENCE_ARGS, TINY  # those of `uninterrupted`
from mopd.config import load_config
from mopd.metrics import read_metrics

pytestmark = pytest.mark.slow


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

    def pid():
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)

    old = pid()
    ray.kill(actor, no_restart=False)
    for _ in range(600):
        try:
            if pid() != old:
                return
        except ActorUnavailableError:
            pass
        time.sleep(0.2)
    raise AssertionError("the killed actor did not come back")


def step_1(loop) -> None:
    kill_during(loop.teachers, "score", loop.teachers.worker("math"))
    kill_during(loop.rollout, "generate", loop.rollout._actors[0])


FAULTS = {  # step -> what happens to it
    1: step_1,
    2: lambda loop: kill_and_wait_restarted(loop.rollout._actors[0]),
    3: lambda loop: kill_during(loop.trainer, "train_step", loop.trainer._actors[1]),  # ranks are not restarted
}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """The recipe's 3 steps (checkpoint at 2) with the FAULTS above: step 3 stops the run."""
    ray = pytest.importorskip("ray")
    from mopd.app.run import RunStoppedError, run_training
    from mopd.loop import MOPDLoop

    out = tmp_path_factory.mktemp("faults")
    cfg = load_config(TINY, [f"run.output_dir={out}", *REFERENCE_ARGS])
    real_step, done = MOPDLoop.train_one_step, set()

    def faulty_step(loop):
        step = loop.step + 1
        if step in FAULTS and step not in done:  # once
            done.add(step)
            FAULTS[step](loop)
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
            result["checkpoints"] = sorted(p.name for p in (out / "checkpoints").iterdir())
    finally:
        logging.getLogger("mopd").removeHandler(logs)
        ray.shutdown()
    result["logs"] = "\n".join(logs.messages)
    result["metrics"] = read_metrics(out / "metrics.jsonl")
    return result


def train_records(records):
    return [r for r in records if "train/loss" in r]


def test_killed_teacher_and_rollout_actors_are_restarted_and_the_step_retried(faulty_run, uninterrupted):
    records = train_records(faulty_run["metrics"])
    assert [r["step"] for r in records] == [1, 2], "a step was lost or repeated"
    assert [r["policy_version"] for r in records] == [1.0, 2.0]
    # The restarted rollout actors came back with the initial weights: the pool re-sent the current
    # ones before retrying, so every batch was sampled by the policy of the step before ...
    assert [r["rollout/policy_version"] for r in records] == [0.0, 1.0]
    assert all(r["train/train_rollout_abs_diff"] < 1e-4 for r in records)
    assert records[0]["faults/teacher_restarts"] == 1.0 and records[0]["faults/rollout_restarts"] == 1.0
    assert records[1]["faults/rollout_restarts"] == 2.0
    logs = faulty_run["logs"]
    assert "teacher actor died (score failed" in logs and "teacher actor restarted" in logs
    assert "rollout actor died (generate failed" in logs
    # ... and one restarted between steps was caught by its policy version in step 2.
    assert "answered with policy version 0, expected 1" in logs
    # The new rollout actors started new tool-environment workers: the agent domain's trajectories
    # still took their tool turns.
    agent = [r for r in records if "rollout/agent/turns" in r]
    assert agent and all(r["rollout/agent/context_tokens"] > 0 for r in agent)
    # Restarted teachers score alike and retried rollouts (tool trajectories included) sample alike:
    # the weights are those of the uninterrupted run with the same seed (bitwise in practice).
    final = hf_weights(faulty_run["out"] / "checkpoints" / "step_000002" / "hf")
    straight = hf_weights(uninterrupted / "checkpoints" / "step_000002" / "hf")
    for k in straight:
        torch.testing.assert_close(final[k], straight[k], rtol=0, atol=1e-6)


def test_killed_trainer_rank_stops_the_run_with_a_resume_hint(faulty_run):
    error = faulty_run["error"]
    assert "trainer rank 1 died during train_step" in error
    assert "checkpoint step 2" in error and "--resume" in error
    # Nothing of the failed step was written: no metrics, no checkpoint (complete or partial).
    assert [r["step"] for r in train_records(faulty_run["metrics"])] == [1, 2]
    assert faulty_run["checkpoints"] == ["step_000002"]


def hf_weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()
