"""Every refusal a user can cause comes before any actor starts, as one ``mopd: error:`` line that
names what to change, with exit status 2, from `mopd validate` and `mopd train` alike.

Regression guards (issue 15, item 2): `mopd validate` passed a teacher with another vocabulary and
bad data rows that `mopd train` then refused; `--resume` with another teacher set was a 17-line
traceback with exit status 1, raised after every actor had started. docs/reliability.md lists each
refusal with its test here.

    pytest tests/test_refusals.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mopd.app.run as run_module
from mopd import checkpoint as ckpt
from mopd.app.cli import main
from mopd.app.run import build_mixer
from mopd.config import load_config
from mopd.loop import teacher_fingerprint

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
BOTH = pytest.mark.parametrize("command", ["validate", "train"])
INLINE_TEACHER = (
    "{tokenizer: 'builtin:char', config: {model_type: llama, vocab_size: 128, hidden_size: 64, "
    "intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1}}"
)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any start of Ray fails the test: every refusal must come before it."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray started for a run that should have been refused before any actor")

    monkeypatch.setattr(run_module, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def refused(capsys, *argv: str) -> str:
    """Run ``mopd ARGV`` in-process; check exit status 2 and one ``mopd: error:`` line on stderr, and return it."""
    status = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("mopd: error: "), err
    return lines[0]


def tiny(tmp_path: Path, *overrides: str) -> list[str]:
    return [str(TINY), f"run.output_dir={tmp_path / 'run'}", *overrides]


def write_checkpoint(tmp_path: Path, step: int = 2) -> Path:
    """A checkpoint of tiny.yaml as the loop records it (state.json: step, data cursor, teacher set)."""
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}"])
    mixer, _ = build_mixer(cfg)
    mixer.next_batch(cfg.rollout.prompts_per_step * step)
    state = {"step": step, "policy_version": step, "data": mixer.state_dict(), "teachers": teacher_fingerprint(cfg)}
    return ckpt.commit(ckpt.begin(ckpt.checkpoint_root(cfg), step), state, keep=2)


# ---------------------------------------------------------------------------------------- the recipe


@BOTH
def test_unknown_key(command, tmp_path, capsys):
    line = refused(capsys, command, *tiny(tmp_path, "trainer.lrr=1"))
    assert "unknown key 'trainer.lrr'" in line and "did you mean 'lr'" in line


@BOTH
def test_file_domain_without_verifier_with_alpha(command, tmp_path, capsys):
    """A domain read from a file, with no registered verifier, and objective.alpha > 0 (it used to
    die with KeyError: "unknown domain 'units'" in the loop, after every actor started)."""
    data = tmp_path / "units.jsonl"
    data.write_text('{"prompt": "2 m in cm?"}\n')
    line = refused(
        capsys,
        command,
        *tiny(tmp_path, f"teachers.units={INLINE_TEACHER}", f"data.sources=[{{domain: units, path: {data}}}]"),
        "objective.alpha=0.5",
    )
    assert "domain 'units' (data.sources[0]) has none" in line and "run.plugins" in line
    assert "or set objective.alpha=0" in line


@BOTH
def test_plugin_that_cannot_be_imported(command, tmp_path, capsys):
    line = refused(capsys, command, *tiny(tmp_path, "run.plugins=[no_such_plugin_module]"))
    assert "run.plugins: cannot import 'no_such_plugin_module'" in line


# ---------------------------------------------------------------------------------------- files


@BOTH
def test_missing_data_file(command, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    line = refused(capsys, command, *tiny(tmp_path, f"data.sources=[{{domain: math, path: {missing}}}]"))
    assert f"data.sources[0].path: file or directory does not exist: {missing}" in line


@BOTH
def test_bad_data_row_is_rejected(command, tmp_path, capsys):
    """A bad row with data.on_bad_row=reject: `mopd validate` passed it, `mopd train` raised a traceback."""
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1="}\n{"prompt": "  "}\n')
    line = refused(capsys, command, *tiny(tmp_path, f"data.sources=[{{domain: math, path: {data}}}]"))
    assert f"{data}, line 2: empty prompt" in line and "data.on_bad_row=skip" in line


@BOTH
def test_bad_eval_row_is_rejected(command, tmp_path, capsys):
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text('{"prompt": "1+1=", "domain": "law"}\n')
    source = f"data.sources=[{{domain: math, generator: math, eval_path: {held_out}}}]"
    line = refused(capsys, command, *tiny(tmp_path, source, "eval.every=1"))
    assert f"{held_out}, line 1: unknown domain 'law'" in line


@BOTH
def test_missing_student_path(command, tmp_path, capsys):
    line = refused(capsys, command, *tiny(tmp_path, "student.config=null", f"student.path={tmp_path / 'nope'}"))
    assert "student.path: file or directory does not exist" in line


@BOTH
@pytest.mark.parametrize("key", ["student", "teachers.code"])
def test_model_directory_that_is_not_a_model(command, key, tmp_path, capsys):
    """The directory exists but holds no config.json: refused naming ``<key>.path`` (it used to pass
    `mopd validate`; `mopd train` raised an OSError traceback from transformers for the student and
    left a teacher to fail in its actor)."""
    empty = tmp_path / "model"
    empty.mkdir()
    line = refused(capsys, command, *tiny(tmp_path, f"{key}.config=null", f"{key}.path={empty}"))
    assert line.startswith(f"mopd: error: {key}: cannot read its tokenizer or model config")
    assert f"set {key}.path to a Hugging Face model directory" in line


@BOTH
def test_missing_tokenizer(command, tmp_path, capsys):
    line = refused(capsys, command, *tiny(tmp_path, f"teachers.code.tokenizer={tmp_path / 'tok'}"))
    assert "teachers.code.tokenizer: directory does not exist" in line


# ---------------------------------------------------------------------------------------- teachers


@BOTH
def test_teacher_with_another_vocabulary(command, tmp_path, capsys):
    """`mopd validate` accepted it (exit 0); only `mopd train` refused it."""
    line = refused(capsys, command, *tiny(tmp_path, "teachers.code.config.vocab_size=256"))
    assert "teacher 'code' vs the student: model_vocab_size: 256 vs 128" in line


# ---------------------------------------------------------------------------------------- --resume


@BOTH
def test_resume_with_another_teacher_set(command, tmp_path, capsys):
    """Was a 17-line traceback with exit status 1 from MOPDLoop.restore, after the actors started."""
    write_checkpoint(tmp_path)
    line = refused(capsys, command, *tiny(tmp_path, "teachers.code.config.hidden_size=32"), "--resume")
    assert "the teacher set differs from the checkpoint's (domains: code)" in line and "--force-teachers" in line


def test_force_teachers_still_resumes_with_another_teacher_set(tmp_path, capsys):
    write_checkpoint(tmp_path)
    argv = ["validate", *tiny(tmp_path, "teachers.code.config.hidden_size=32"), "--resume", "--force-teachers"]
    assert main(argv) == 0, capsys.readouterr().err


@BOTH
def test_resume_with_other_data(command, tmp_path, capsys):
    """The checkpoint's data cursor is for other sources: refused before Ray, not in MOPDLoop.restore."""
    write_checkpoint(tmp_path)
    sources = "data.sources=[{domain: math, generator: math, num_prompts: 50}, {domain: code, generator: code}]"
    line = refused(capsys, command, *tiny(tmp_path, sources), "--resume")
    assert "--resume: the data differs from checkpoint" in line and "data.sources" in line and "run.seed" in line


@BOTH
def test_resume_with_another_student(command, tmp_path, capsys):
    """A checkpoint of a student of another shape: refused before Ray, not when DeepSpeed loads it."""
    from mopd.models import load_model

    checkpoint = write_checkpoint(tmp_path)
    load_model(load_config(TINY).student).config.save_pretrained(checkpoint / "hf")  # as the trainer's save_hf
    assert main(["validate", *tiny(tmp_path), "--resume"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    line = refused(capsys, command, *tiny(tmp_path, "student.config.hidden_size=32"), "--resume")
    assert "--resume: the student differs from checkpoint" in line and "hidden_size: 32 vs 64" in line
    assert "student.path or student.config" in line


@BOTH
def test_resume_with_nothing_to_resume(command, tmp_path, capsys):
    """No checkpoint and no earlier run in run.output_dir (a mistyped run.name, say)."""
    line = refused(capsys, command, *tiny(tmp_path), "--resume")
    assert "--resume: nothing to resume" in line and "run.output_dir" in line and "checkpoint.dir" in line


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    """A run that started (its recipe.yaml is written before the actors) but saved no checkpoint:
    --resume starts from step 0, as the stopped run's message says."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("{}\n")
    assert main(["validate", *tiny(tmp_path), "--resume"]) == 0, capsys.readouterr().err


def test_export_of_a_missing_checkpoint(tmp_path, capsys):
    line = refused(capsys, "export", str(tmp_path / "checkpoints"), str(tmp_path / "out"))
    assert f"no complete checkpoint at {tmp_path / 'checkpoints'}" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- one check


def test_validate_and_train_run_the_same_checks_before_ray(tmp_path, capsys, monkeypatch):
    """`mopd validate` and `mopd train` call one preflight with the same arguments; `train` calls it
    before Ray (the no_ray fixture), so what validate passes, train does not refuse later for a
    reason found without an actor."""
    calls = []

    def spy(cfg, resume=False, force_teachers=False):
        calls.append((cfg.run.output_dir, resume, force_teachers))
        raise run_module.ConfigError("stop here")

    monkeypatch.setattr(run_module, "preflight", spy)
    for command in ("validate", "train"):
        assert refused(capsys, command, *tiny(tmp_path), "--resume", "--force-teachers") == "mopd: error: stop here"
    assert calls == [(str(tmp_path / "run"), True, True)] * 2
    assert not (tmp_path / "run").exists()  # nothing written before the checks pass


# ---------------------------------------------------------------------------------------- sandbox

EXEC_SOURCE = "data.sources=[{domain: code, generator: code_exec, num_prompts: 20}]"


@BOTH
@pytest.mark.parametrize("use", ["objective.alpha=0.5", "eval.every=1"])
def test_executing_verifier_without_isolation(command, use, tmp_path, capsys, monkeypatch):
    """Regression (issue 15, item 3): where the sandbox has no kernel layer (not root, no unshare),
    model-written code would be guarded only by the audit hook, which a program gets past; a run
    whose verifier executes responses is refused before it starts unless the recipe opts in."""
    from mopd import sandbox

    monkeypatch.setattr(sandbox, "isolation", lambda: "basic")
    monkeypatch.setattr(sandbox, "_WHY_BASIC", "not root")
    line = refused(capsys, command, *tiny(tmp_path, EXEC_SOURCE, use))
    assert "verifier of domain 'code' executes model output" in line and use.split("=")[0] in line, line
    assert "(not root)" in line and "sandbox.allow_unisolated=true" in line, line


def test_executing_verifier_refusal_is_only_where_needed(tmp_path, monkeypatch):
    """No refusal with the opt-in, where isolation works, or where nothing is executed (exact-match
    code rows; code_exec rows that no verifier sees: alpha 0 and no eval)."""
    from mopd import sandbox

    def check(*overrides: str) -> None:
        cfg = load_config(TINY, tiny(tmp_path, *overrides)[1:])
        run_module.check_sandbox(cfg, build_mixer(cfg)[0], run_module.build_eval_rows(cfg))

    monkeypatch.setattr(sandbox, "isolation", lambda: "basic")
    with pytest.raises(run_module.ConfigError, match="sandbox.allow_unisolated"):
        check(EXEC_SOURCE, "eval.every=1")
    check("sandbox.allow_unisolated=true", EXEC_SOURCE, "objective.alpha=0.5", "eval.every=1")
    check("objective.alpha=0.5", "eval.every=1")
    check(EXEC_SOURCE)
    monkeypatch.setattr(sandbox, "isolation", lambda: "namespaces")
    check(EXEC_SOURCE, "objective.alpha=0.5", "eval.every=1")
