"""The loop's phases with in-process components (no Ray): verifier rewards become GRPO outcome
advantages when alpha > 0, non-finite inputs skip the update, and a streak of them aborts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mopd.app.run import build_eval_rows, build_mixer
from mopd.config import load_config
from mopd.loop import MOPDLoop, NonFiniteError
from mopd.metrics import MetricsWriter
from rollout.pool import RolloutPool
from teachers.pool import TeacherPool

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


class RecordingTrainer:
    """Stands in for the trainer: keeps the batches it is given and reports a finite loss."""

    def __init__(self):
        self.batches = []

    def train_step(self, batch):
        self.batches.append(batch)
        return {"train/loss": 0.0, "train/skipped": 0.0}

    def state_dict(self):
        return {}


class NoSync(RolloutPool):
    def sync_weights(self, state_dict, version):  # the recording trainer has no weights to send
        self.synced = version


def make_loop(tmp_path, *overrides):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "rollout.n=4", "rollout.max_new_tokens=6", *overrides])
    mixer, _ = build_mixer(cfg)
    trainer = RecordingTrainer()
    loop = MOPDLoop(
        cfg,
        NoSync(cfg, local=True),
        TeacherPool(cfg.teachers, 0, local=True),
        trainer,
        mixer,
        MetricsWriter(tmp_path, tensorboard=False),
    )
    return loop, trainer


def answered(batch, right: list[bool]):
    """``batch`` with each response replaced: the row's answer where ``right[i]``, else a wrong one."""
    responses = [str(r.meta["answer"]) if ok else "not the answer" for r, ok in zip(batch.rows, right, strict=True)]
    return dataclasses.replace(batch, responses=responses)


def test_alpha_turns_verifier_rewards_into_group_advantages(tmp_path):
    """The tiny random student answers nothing right (all rewards 0: every advantage is 0, which a
    loop that dropped the rewards would give too). Here the k-th of a group's 4 responses is right
    where k <= group % 3: 1, 2 or 3 right per group, so the advantages have both signs."""
    loop, trainer = make_loop(tmp_path, "objective.alpha=0.5")
    real_generate = loop.rollout.generate

    def some_right(rows, n, seed, greedy=False):
        batch = real_generate(rows, n, seed, greedy)
        gids = batch.group_ids.tolist()
        k = [gids[:i].count(g) for i, g in enumerate(gids)]  # index within its group
        return answered(batch, [k[i] <= gids[i] % 3 for i in range(len(gids))])

    loop.rollout.generate = some_right
    metrics = loop.train_one_step()
    batch = trainer.batches[0].rollout
    adv = trainer.batches[0].adv_orm
    assert adv is not None and adv.shape == (len(batch),)
    right = [r == str(w.meta["answer"]) for r, w in zip(batch.responses, batch.rows, strict=True)]
    rewards = torch.tensor(right, dtype=torch.float32)
    assert 0 < rewards.mean() < 1
    for g in batch.group_ids.unique():
        r, a = rewards[batch.group_ids == g], adv[batch.group_ids == g]
        assert 0 < r.sum() < len(r), "every group must have right and wrong answers"
        # GRPO with the population std: a right answer gets (1 - p) / sd, a wrong one -p / sd.
        p = float(r.mean())
        sd = (p * (1 - p)) ** 0.5
        torch.testing.assert_close(a, torch.where(r > 0, (1 - p) / sd, -p / sd), rtol=0, atol=1e-4)
        assert (a[r > 0] > 0).all() and (a[r == 0] < 0).all() and abs(float(a.mean())) < 1e-5
    for d in set(batch.domains):
        mine = torch.tensor([x == d for x in batch.domains])
        assert metrics[f"verify/{d}/reward"] == pytest.approx(float(rewards[mine].mean()))


def test_alpha_zero_sends_no_outcome_advantage(tmp_path):
    loop, trainer = make_loop(tmp_path)
    loop.train_one_step()
    assert trainer.batches[0].adv_orm is None


def test_nonfinite_teacher_logprobs_skip_then_abort(tmp_path):
    loop, trainer = make_loop(tmp_path, "objective.max_nonfinite_steps=2")
    real_score = loop.teachers.score

    def nan_scores(batch, topk=0):
        scores, m = real_score(batch, topk)
        scores.logprobs[batch.response_mask] = float("nan")
        return scores, m

    loop.teachers.score = nan_scores
    metrics = loop.train_one_step()
    assert metrics["train/skipped"] == 1.0 and not trainer.batches and loop.policy_version == 0
    with pytest.raises(NonFiniteError, match="--resume"):
        loop.train_one_step()


@pytest.mark.parametrize("where", ["rollout_nan", "teacher_inf", "teacher_topk_nan"])
def test_nonfinite_rollout_or_teacher_topk_logprobs_skip_the_update(tmp_path, where, caplog):
    """The student's sampled log-probs and the teachers' top-k log-probs are checked too, not only
    the teachers' log-probs of the sampled tokens; the skip is logged and counted in the streak."""
    loop, trainer = make_loop(tmp_path, "objective.kind=topk", "objective.topk=4")
    real_generate, real_score = loop.rollout.generate, loop.teachers.score

    def generate(rows, n, seed, greedy=False):
        batch = real_generate(rows, n, seed, greedy)
        if where == "rollout_nan":
            row, col = batch.response_mask.nonzero()[0].tolist()
            batch.rollout_logprobs[row, col] = float("nan")
        return batch

    def score(batch, topk=0):
        scores, m = real_score(batch, topk)
        row, col = batch.response_mask.nonzero()[0].tolist()
        if where == "teacher_inf":
            scores.logprobs[row, col] = float("inf")
        if where == "teacher_topk_nan":
            scores.topk_logprobs[row, col, 0] = float("nan")
        return scores, m

    loop.rollout.generate, loop.teachers.score = generate, score
    metrics = loop.train_one_step()
    assert metrics["train/skipped"] == 1.0 and not trainer.batches and loop.policy_version == 0
    assert loop.nonfinite_streak == 1 and "update skipped" in caplog.text


class VersionedSync(RolloutPool):
    """No weights to send (the recording trainer has none), but the actor takes the version, so
    every batch says which policy version generated it."""

    def sync_weights(self, state_dict, version):
        self._actors[0]._version = int(version)


def _overlap_loop(tmp_path, total, *overrides):
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            f"run.total_steps={total}",
            "rollout.n=2",
            "rollout.max_new_tokens=4",
            *overrides,
        ],
    )
    mixer, _ = build_mixer(cfg)
    rollout = VersionedSync(cfg, local=True)
    writer = MetricsWriter(tmp_path, tensorboard=False)
    return MOPDLoop(
        cfg, rollout, TeacherPool(cfg.teachers, 0, local=True), RecordingTrainer(), mixer, writer, build_eval_rows(cfg)
    )


def _steps(loop, steps):
    metrics = []
    try:
        for _ in range(steps):
            metrics.append(loop.train_one_step())
    finally:
        loop.close()
    return metrics


def _run_steps(tmp_path, steps, *overrides):
    loop = _overlap_loop(tmp_path, steps, *overrides)
    metrics = _steps(loop, steps)
    return loop.trainer.batches, metrics


def test_overlap_generates_one_step_ahead_and_drains_before_checkpoints(tmp_path):
    """rollout.overlap: the same prompts, seeds and samples as the sequential loop, each batch one
    policy version behind, except the batch after a checkpoint step (6 steps, checkpoint every 3),
    which is generated afresh, as a resumed run would."""
    seq, _ = _run_steps(tmp_path / "seq", 6, "checkpoint.every=3")
    ovl, metrics = _run_steps(tmp_path / "ovl", 6, "checkpoint.every=3", "rollout.overlap=true")
    assert [b.rollout.policy_version for b in seq] == [0, 1, 2, 3, 4, 5]
    assert [b.rollout.policy_version for b in ovl] == [0, 0, 1, 3, 3, 4]
    for s, o in zip(seq, ovl, strict=True):
        assert s.rollout.rows == o.rollout.rows
        # NoSync leaves the weights as they are, so the same seed must give the same samples.
        assert torch.equal(s.rollout.input_ids, o.rollout.input_ids)
    # The driver waits for a batch generated ahead only on the steps that started one.
    assert ["timing/rollout_wait" in m for m in metrics] == [True, True, False, True, True, False]


def test_overlap_resumed_at_a_checkpoint_step_generates_what_the_uninterrupted_run_did(tmp_path):
    """What a checkpoint at step 3 holds (step, policy version, data order) is all a resumed run
    needs: the pipeline was empty there, so steps 4-6 get the same batches from the same versions."""
    over = ("checkpoint.every=3", "rollout.overlap=true")
    full, _ = _run_steps(tmp_path / "full", 6, *over)
    first = _overlap_loop(tmp_path / "first", 6, *over)
    _steps(first, 3)
    resumed = _overlap_loop(tmp_path / "resumed", 6, *over)
    resumed.step, resumed.policy_version = first.step, first.policy_version
    resumed.mixer.load_state_dict(first.mixer.state_dict())
    resumed.rollout.sync_weights({}, first.policy_version)  # restore() re-sends the weights
    _steps(resumed, 3)
    for a, b in zip(full[3:], resumed.trainer.batches, strict=True):
        assert a.rollout.rows == b.rollout.rows and a.rollout.policy_version == b.rollout.policy_version
        assert torch.equal(a.rollout.input_ids, b.rollout.input_ids)


def test_overlap_drains_before_eval_and_the_last_step(tmp_path):
    _, metrics = _run_steps(tmp_path, 4, "checkpoint.every=0", "eval.every=2", "rollout.overlap=true")
    assert ["timing/rollout_wait" in m for m in metrics] == [True, False, True, False]


def test_pools_start_together_and_the_first_failure_in_order_is_raised():
    import threading

    from mopd.app.run import start_pools

    barrier = threading.Barrier(3, timeout=10)  # passes only if all three starters run at once

    def ok(name):
        def start():
            barrier.wait()
            return name

        return start

    pools = []
    assert start_pools(pools, ok("teachers"), ok("trainer"), ok("rollout")) == ["teachers", "trainer", "rollout"]
    assert pools == ["teachers", "trainer", "rollout"]

    def fail(msg):
        def start():
            raise RuntimeError(msg)

        return start

    pools = []
    with pytest.raises(RuntimeError, match="vocabulary"):
        start_pools(pools, fail("vocabulary"), lambda: "trainer", fail("rollout"))
    assert pools == ["trainer"]  # started, so the caller can shut it down


def test_tool_environment_fault_counters_reach_the_step_metrics(tmp_path, monkeypatch):
    """``faults/env_*`` of the replicas' environment pools are in a step's metrics (when its batch
    holds tool trajectories); counters still at zero are left out, like the actor restarts."""
    from mopd.dist.env_pool import EnvPool

    layers = Path(__file__).resolve().parent / "layers"
    monkeypatch.setattr(EnvPool, "metrics", lambda self: {"faults/env_restarts": 2.0, "faults/env_wedged": 0.0})
    loop, _ = make_loop(
        tmp_path,
        str(layers / "agent.yaml"),
        f"run.plugins=[{layers / 'calls_every_turn.py'}]",
        "environments.agent.workers=0",
        "data.sources=[{domain: agent, generator: agent_lookup, num_prompts: 20}]",
    )
    metrics = loop.train_one_step()
    assert metrics["rollout/agent/turns"] > 0
    assert metrics["faults/env_restarts"] == 2.0 and "faults/env_wedged" not in metrics
