"""Fixtures shared by test modules, and the hooks of tests/features.py (optional features: skipped
where missing, a failure where ``MOPD_REQUIRE`` names them, as ``.ci/run`` does).

``uninterrupted``: one 3-step `mopd train recipes/tiny.yaml` run (trainer world size 2, ZeRO-2, plus
the multi-turn ``agent`` domain of tests/layers/agent.yaml), the reference that interrupted runs
(tests/test_train_e2e.py, tests/test_faults.py) must match.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from features import pytest_configure, pytest_runtest_setup  # noqa: F401 (pytest finds hooks by name)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
LAYERS = ROOT / "tests" / "layers"
# What the uninterrupted run and every run compared with it share (the recipe's 3 steps, checkpoint
# every 2): two trainer ranks, and a third domain rolled out over tool turns, its environment on a
# worker actor of each rollout replica, so that faults and resumes are checked with tool trajectories.
REFERENCE_ARGS = [
    "trainer.world_size=2",
    "trainer.zero_stage=2",
    str(LAYERS / "agent.yaml"),
    f"run.plugins=[{LAYERS / 'calls_every_turn.py'}]",
]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """Three steps in one go, trainer world size 2 with ZeRO-2; returns the output directory."""
    out = tmp_path_factory.mktemp("run_a")
    cmd = [sys.executable, "-m", "mopd.app.cli", "train", str(TINY), f"run.output_dir={out}", *REFERENCE_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out
