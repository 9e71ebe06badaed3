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

# The tests' own `ray.init` calls start no idle workers ahead, as `mopd train`'s local Ray does not
# (mopd.dist.runtime.local_ray_kwargs): no test's actor would use them, and they cost CPU time.
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

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


@pytest.fixture(scope="module")
def smollm() -> Path:
    """SmolLM2-135M-Instruct converted to a Hugging Face directory in ``$MOPD_CACHE`` (converted now
    if this is the first run: scripts/real_model.py), for the modules that use the real model."""
    from features import require

    sys.path.insert(0, str(ROOT / "scripts"))
    import real_model

    target = real_model.default_dir()
    require("smollm2")  # skipped without it, failed where MOPD_REQUIRE names it (tests/features.py)
    return real_model.ensure_converted(target)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, worker_id: str) -> Path:
    """Three steps in one go, trainer world size 2 with ZeRO-2; returns the output directory. Run
    once per test session: with pytest-xdist (``-n 2``) the first worker that needs it runs it in
    the session's shared temp directory, and the others wait for it and read the same directory."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out, done = shared / "uninterrupted", shared / "uninterrupted.done"
    with FileLock(str(shared / "uninterrupted.lock")):
        if not done.exists():
            cmd = [sys.executable, "-m", "mopd.app.cli", "train", str(TINY), f"run.output_dir={out}", *REFERENCE_ARGS]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            assert proc.returncode == 0, proc.stderr[-4000:]
            done.touch()
    return out


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    """pytest-xdist's worker name (gw0, gw1, ...), "master" without it: also where xdist is absent."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


# The modules that take longest, started first and alternating between the two workers of the
# README's test command (``-n 2 --dist loadfile``): each module runs whole on one worker, and the
# scheduler below hands them out in this order (pytest-xdist would otherwise sort modules by their
# number of tests), so the long ones go out while the other worker works through the many short ones.
LONGEST_FIRST = (
    "test_quickstart.py",
    "test_train_e2e.py",
    "test_faults.py",
    "test_real_model.py",
    "test_cluster.py",
    "test_envs.py",
    "test_rollout_vllm.py",
    "test_vllm_lora_sync.py",
    "test_remote_teacher.py",
    "test_placement.py",
    "test_weight_sync.py",
)
# Modules that share the ``uninterrupted`` reference run go to one worker, one after the other:
# on two workers, one would wait for the other's run (~2 minutes) instead of testing.
SAME_WORKER = {"test_faults.py": "test_train_e2e.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order kept


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With ``--dist loadfile``: modules in collection order (``LONGEST_FIRST``), and the modules of
    ``SAME_WORKER`` as one unit. Other modes: pytest-xdist's own scheduler."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            head, _, name = path.rpartition("/")
            return f"{head}/{SAME_WORKER[name]}" if name in SAME_WORKER else path

    config.option.loadscopereorder = False
    return Scheduling(config, log)
