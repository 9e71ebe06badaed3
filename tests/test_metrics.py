"""PhaseTimer: per-phase wall times and the step total with its unnamed remainder, checked against
sleeps of known length and a clock outside the timer (``timing/other`` is the step less the named
phases by definition; what is tested is that each number measures what it names)."""

import time

from mopd.metrics import PhaseTimer
from test_loop import make_loop


def test_phase_timer_against_known_sleeps_and_an_outside_clock():
    t0 = time.perf_counter()
    timer = PhaseTimer(total="step")
    time.sleep(0.02)  # before the first phase: part of the step, in "other"
    with timer("rollout"):
        time.sleep(0.05)
    time.sleep(0.03)  # between phases: "other" too
    with timer("train"):
        time.sleep(0.02)
    with timer("rollout"):  # a phase entered twice adds up
        time.sleep(0.01)
    m = timer.metrics()
    wall = time.perf_counter() - t0
    assert set(m) == {"timing/rollout", "timing/train", "timing/step", "timing/other"}
    assert m["timing/rollout"] >= 0.06 and m["timing/train"] >= 0.02 and m["timing/other"] >= 0.05, m
    assert 0.13 <= m["timing/step"] <= wall, (m, wall)
    assert m["timing/rollout"] + m["timing/train"] <= m["timing/step"], m


# Known sleeps injected into each phase of one loop step, and one outside every phase.
SLEEPS = {"rollout": 0.12, "teachers": 0.09, "train": 0.07, "sync": 0.05}
OUTSIDE = 0.06


def _slowed(fn, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return slow


def test_loop_step_phases_each_hold_their_own_time(tmp_path):
    """Each phase of MOPDLoop.train_one_step is timed around its own work: every timing/<phase> is at
    least the sleep put into that phase, the sleep outside them lands in timing/other, and the named
    phases (disjoint intervals of the step) add up to no more than the step as an outside clock saw it."""
    loop, trainer = make_loop(tmp_path)
    loop.rollout.generate = _slowed(loop.rollout.generate, SLEEPS["rollout"])
    loop.teachers.score = _slowed(loop.teachers.score, SLEEPS["teachers"])
    trainer.train_step = _slowed(trainer.train_step, SLEEPS["train"])
    loop.rollout.sync_from = _slowed(loop.rollout.sync_from, SLEEPS["sync"])
    loop._start_next = _slowed(loop._start_next, OUTSIDE)  # between the rollout and teachers phases
    t0 = time.perf_counter()
    m = loop.train_one_step()
    wall = time.perf_counter() - t0
    for phase, seconds in SLEEPS.items():
        assert m[f"timing/{phase}"] >= seconds, (phase, m)
    assert m["timing/other"] >= OUTSIDE, m
    named = sum(v for k, v in m.items() if k.startswith("timing/") and k not in ("timing/step", "timing/other"))
    assert sum(SLEEPS.values()) <= named <= m["timing/step"] <= wall, (named, m, wall)


def test_phase_timer_without_total_reports_phases_only():
    timer = PhaseTimer()
    with timer("eval"):
        pass
    assert set(timer.metrics()) == {"timing/eval"}
