"""PhaseTimer: per-phase wall times and the step total with its unnamed remainder."""

import time

from mopd.metrics import PhaseTimer


def test_phase_timer_total_and_other():
    timer = PhaseTimer(total="step")
    with timer("rollout"):
        time.sleep(0.02)
    time.sleep(0.02)  # outside every named phase: counted as "other"
    with timer("train"):
        time.sleep(0.01)
    m = timer.metrics()
    assert set(m) == {"timing/rollout", "timing/train", "timing/step", "timing/other"}
    assert abs(m["timing/step"] - (m["timing/rollout"] + m["timing/train"] + m["timing/other"])) < 1e-6
    assert m["timing/other"] >= 0.015


def test_phase_timer_without_total_reports_phases_only():
    timer = PhaseTimer()
    with timer("eval"):
        pass
    assert set(timer.metrics()) == {"timing/eval"}
