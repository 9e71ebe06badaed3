"""Checkpoints a crash leaves behind, the metrics a resumed run keeps, and how a run that lost a
trainer rank stops (in-process components, no Ray).

    OMP_NUM_THREADS=1 pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import io
import json
import shlex
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from mopd import checkpoint as ckpt
from mopd.app.run import _checkpoint_to_resume, build_mixer
from mopd.config import load_config
from mopd.dist.actors import ActorFailedError
from mopd.loop import MOPDLoop
from mopd.metrics import MetricsWriter, read_metrics

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


class FileTrainer:
    """Stands in for the trainer's checkpoint calls: writes files, and can die half-way through."""

    def __init__(self):
        self.crash_in_save_hf = False

    def save_checkpoint(self, path, client_state):
        Path(path).mkdir(parents=True)
        (Path(path) / "engine.pt").write_text(json.dumps(client_state))

    def save_hf(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        if self.crash_in_save_hf:
            raise KeyboardInterrupt("killed while writing the weights")  # not an Exception: like a kill
        (Path(path) / "model.safetensors").write_text("weights")

    def load_checkpoint(self, path):
        return json.loads((Path(path) / "engine.pt").read_text())

    def state_dict(self):
        return {}


class NoRollout:
    def sync_from(self, trainer, version):
        self.version = version


def make_loop(cfg, trainer):
    mixer, _ = build_mixer(cfg)
    return MOPDLoop(cfg, NoRollout(), None, trainer, mixer, writer=None)


def test_crash_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """Regression guard: a save killed half-way must neither be taken for a checkpoint nor hide
    the previous one, and the next save must clear what it left."""
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}"])
    trainer = FileTrainer()
    loop = make_loop(cfg, trainer)
    loop.mixer.next_batch(4)
    loop.step, loop.policy_version = 1, 1
    first = loop.save()
    cursor = loop.mixer.state_dict()

    loop.mixer.next_batch(4)
    loop.step, loop.policy_version = 2, 2
    trainer.crash_in_save_hf = True
    with pytest.raises(KeyboardInterrupt):
        loop.save()
    root = first.parent
    assert (root / "step_000002.tmp" / "trainer" / "engine.pt").is_file()  # the partial save is there ...
    # ... and one killed between writing state.json and the rename looks the same to a reader.
    (root / "step_000003.tmp").mkdir()
    (root / "step_000003.tmp" / ckpt.STATE_FILE).write_text("{}")
    assert ckpt.latest_checkpoint(root) == first
    assert _checkpoint_to_resume(cfg, resume=True, force_teachers=False) == first

    resumed = make_loop(cfg, FileTrainer())
    resumed.restore(first)
    assert (resumed.step, resumed.policy_version) == (1, 1)
    assert resumed.mixer.state_dict() == cursor
    assert resumed.rollout.version == 1  # the rollout engines get the restored weights
    resumed.step = 2
    assert resumed.save().name == "step_000002"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]


def test_directory_without_state_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_000001").mkdir()
    (tmp_path / "step_000001" / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "step_000002" / "trainer").mkdir(parents=True)  # no state.json: incomplete
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve(tmp_path / "step_000002")


def test_resumed_run_drops_the_metrics_of_the_steps_it_redoes(tmp_path):
    """A run killed after checkpoint 2 had logged steps 3 and 4 (the last line torn by the kill):
    the resumed run redoes them, so their old records go and each step appears once."""
    writer = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(5):
        writer.write(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    MetricsWriter(tmp_path, tensorboard=False, resume_step=2).write(3, {"train/loss": 30.0})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0),
    ]  # fmt: skip


class RankDiesAt(FileTrainer):
    """A trainer whose rank 1 dies during the train step of ``step``."""

    def __init__(self, step):
        super().__init__()
        self.step, self.calls = step, 0

    def train_step(self, batch):
        self.calls += 1
        if self.calls == self.step:
            raise ActorFailedError("trainer rank 1 died during train_step: The actor died unexpectedly")
        return {"train/loss": 0.0, "train/skipped": 0.0}


BAD_ROWS = ['{"prompt": "1+1=",', {"prompt": ""}, {"prompt": "x", "domain": "law"}, {"prompt": "9" * 300}]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """`mopd train` (in-process pools, no Ray) whose trainer rank dies at step 3, on a data file
    with one bad row of each kind and ``data.on_bad_row=skip``; returns (status, stderr, shut
    pools, argv, output dir)."""
    import mopd.app.run
    import rollout
    import teachers
    import trainers
    from mopd.app.cli import main
    from rollout.pool import RolloutPool
    from teachers.pool import TeacherPool

    out, shut = tmp_path_factory.mktemp("stopped"), []
    good = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    data = out / "math.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in good + BAD_ROWS))

    class LocalRollout(RolloutPool):
        def __init__(self, cfg, placement=None):
            super().__init__(cfg, local=True)

        def sync_weights(self, state_dict, version):
            pass

        def shutdown(self):
            shut.append("rollout")
            raise RuntimeError("rollout actor already dead")  # the others are still shut down

    class Trainer(RankDiesAt):
        def shutdown(self):
            shut.append("trainer")

    class NoPlacement:  # the pools above are in-process: no Ray placement group to reserve
        def shutdown(self):
            shut.append("placement")

    class LocalTeachers(TeacherPool):
        def __init__(self, cfg_teachers, seed, *args, **kwargs):
            super().__init__(cfg_teachers, seed, local=True)

        def shutdown(self):
            shut.append("teachers")
            super().shutdown()

    argv = [
        "train", str(TINY), f"run.output_dir={out}", "checkpoint.every=2", "rollout.max_new_tokens=4",
        "data.on_bad_row=skip", f"data.sources=[{{domain: math, path: '{data}'}}, {{domain: code, generator: code}}]",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mopd.app.run, "init_ray", lambda cfg: None)
        mp.setattr(mopd.app.run.RunPlacement, "create", classmethod(lambda cls, cfg: NoPlacement()))
        mp.setattr(rollout, "RolloutPool", LocalRollout)
        mp.setattr(teachers, "TeacherPool", LocalTeachers)
        mp.setattr(trainers, "TrainerPool", lambda cfg, placement: Trainer(step=3))
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(argv)
    return status, err.getvalue(), shut, argv, out


def test_dead_trainer_rank_stops_the_run_and_names_the_resume_command(stopped_run):
    """`mopd train` whose trainer rank dies at step 3: exit status 1, every pool shut down (even
    when one of them fails to), nothing saved after checkpoint 2, and the command to continue."""
    status, err, shut, argv, out = stopped_run
    assert status == 1
    assert "trainer rank 1 died during train_step" in err and "checkpoint step 2" in err
    assert "to continue: mopd train " + " ".join(shlex.quote(a) for a in argv[1:]) + " --resume" in err
    assert shut == ["rollout", "trainer", "teachers", "placement"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]


def test_skipped_bad_rows_are_counted_in_the_metrics(stopped_run):
    first = read_metrics(stopped_run[-1] / "metrics.jsonl")[0]
    assert first["step"] == 0 and first["data/loaded"] == 3 + 1000  # math file + code generator
    for kind in ("malformed_json", "empty_prompt", "unknown_domain", "prompt_too_long"):
        assert first[f"data/skipped/{kind}"] == 1, kind


def test_other_teacher_set_is_refused_unless_forced(caplog):
    from mopd.loop import ConfigMismatchError, check_teacher_set

    saved, current = {"math": "aa (m)", "code": "bb (c)"}, {"math": "aa (m)", "code": "cc (c2)"}
    with pytest.raises(ConfigMismatchError, match=r"teacher set differs .*domains: code.*--force-teachers"):
        check_teacher_set(saved, current, force=False)
    check_teacher_set(saved, current, force=True)
    assert "(forced)" in caplog.text
