"""`mopd check`, the teacher preflight (mopd/app/check.py): each teacher against the student before
any actor starts, a mismatch one ``mopd: error:`` line with exit status 2.

Regression guards (issue 14, item 5): a teacher whose path was the student's gave exactly zero loss
and gradient every step with no word from the toolkit; a teacher with other stop ids, other token
ids for the same text, or replicas that load different weights gave a wrong signal silently.

    pytest tests/test_check.py
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mopd.app.run as run_module
from mopd.app.cli import main
from mopd.models import build_char_tokenizer

LLAMA = dict(
    model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip


def save_model(path: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A tiny Llama (128 output rows: the char tokenizer's 99 tokens + 29 padding) with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**LLAMA, **overrides}
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(path)
    (tokenizer or build_char_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    student = save_model(root / "student", seed=0)
    copy = root / "student_copy"  # the student's weights at another path
    shutil.copytree(student, copy)
    return {
        "student": student,
        "copy": copy,
        "other": save_model(root / "other", seed=1),
        # Peaked random logits (initializer_range 1): far from the near-uniform student.
        "sharp": save_model(root / "sharp", seed=2, initializer_range=1.0),
    }


def recipe(tmp_path: Path, student: Path, teacher: Path, **teacher_keys) -> list[str]:
    """A one-domain recipe (generated math prompts) of a student and a teacher directory."""
    doc = {
        "run": {"total_steps": 1, "output_dir": str(tmp_path / "run")},
        "student": {"path": str(student)},
        "teachers": {"math": {"path": str(teacher), **teacher_keys}},
        "data": {"sources": [{"domain": "math", "generator": "math", "num_prompts": 8}]},
        "rollout": {"n": 1, "prompts_per_step": 2, "max_new_tokens": 12},
    }
    path = tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.create(doc), path)
    return [str(path)]


def check(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what building the models printed
    status = main(["check", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def refused(capsys, *argv: str) -> str:
    status, _, err = check(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("mopd: error: "), err
    return lines[0]


def table_value(out: str, check_name: str, table: str = "teacher 'math'") -> str:
    """The result column of the row named ``check_name`` in the table titled ``table ...``."""
    section = out[out.index(f"\n{table}") :] if not out.startswith(table) else out
    m = re.search(rf"^  {re.escape(check_name)}\s+\S+\s+(.*)$", section, re.M)
    assert m, out
    return m.group(1)


# ---------------------------------------------------------------------------------------- cheap part


def test_all_pass(models, tmp_path, capsys):
    status, out, err = check(capsys, *recipe(tmp_path, models["student"], models["other"]))
    assert status == 0 and err == "", err
    assert "teacher 'math' (path " in out and "FAIL" not in out and "warn" not in out
    for name in ("tokenizer", "output rows", "probe ids", "special ids", "stop ids", "not the student"):
        assert table_value(out, name)
    assert out.rstrip().endswith("all teacher checks pass (tokenizers and configs; --models loads the models)")


def test_padded_rows_are_accepted_when_the_real_tokenizers_match(models, tmp_path, capsys):
    """128 output rows for the char tokenizer's 99 tokens, on both sides: the padding is no mismatch."""
    status, out, _ = check(capsys, *recipe(tmp_path, models["student"], models["other"]))
    assert status == 0
    assert table_value(out, "output rows") == "128 = 99 tokens + 29 padding rows, as the student's"
    assert table_value(out, "output rows", "student") == "128 = 99 tokens + 29 padding rows"


def test_student_with_fewer_rows_than_tokens(models, tmp_path, capsys):
    student = save_model(tmp_path / "small", vocab_size=64)
    line = refused(capsys, *recipe(tmp_path, student, models["other"]))
    assert "student: output rows: 64 rows for 99 tokens: ids 64..98 have no row" in line


def test_teacher_with_another_vocabulary(models, tmp_path, capsys):
    tok = build_char_tokenizer()
    tok.add_tokens(["<extra>"])
    teacher = save_model(tmp_path / "teacher", tokenizer=tok)
    line = refused(capsys, *recipe(tmp_path, models["student"], teacher))
    assert "teacher 'math' vs the student: tokenizer_vocab_size: 100 vs 99; vocab_hash" in line


def test_same_vocabulary_that_tokenises_differently(models, tmp_path, capsys):
    """Same strings, ids and specials (the vocabulary signature matches) but a lower-casing
    normalizer: the probe text's ids differ, and only the probe sees it."""
    from tokenizers import normalizers

    tok = build_char_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    teacher = save_model(tmp_path / "teacher", tokenizer=tok)
    line = refused(capsys, *recipe(tmp_path, models["student"], teacher))
    assert "teacher 'math': probe ids: 246 ids vs the student's 246, first difference at position 1" in line


def test_teacher_with_other_stop_ids(models, tmp_path, capsys):
    """A generation_config.json that stops on another id too (a chat model's end of turn)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(models["other"], teacher)
    (teacher / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    line = refused(capsys, *recipe(tmp_path, models["student"], teacher))
    assert "teacher 'math': stop ids: [2, 5] (generation_config.json + tokenizer EOS) vs the student's [2]" in line


def test_teacher_with_another_eos(models, tmp_path, capsys):
    tok = build_char_tokenizer()
    tok.eos_token = "\n"
    teacher = save_model(tmp_path / "teacher", tokenizer=tok)
    line = refused(capsys, *recipe(tmp_path, models["student"], teacher))
    assert "teacher 'math' vs the student: special_token_ids:" in line and "'eos': 3" in line


TURNS = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
NO_SYSTEM = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"


@pytest.mark.parametrize("template", [TURNS, NO_SYSTEM + TURNS], ids=["system", "no-system-role"])
def test_chat_prompt_ids_are_compared_when_the_student_has_a_template(template, models, tmp_path, capsys):
    """A template that refuses a system turn (Gemma's) is rendered with the user turn alone."""
    student = tmp_path / "student"
    shutil.copytree(models["student"], student)
    tok = build_char_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(student)
    status, out, err = check(capsys, *recipe(tmp_path, student, models["other"]))
    assert status == 0, err
    assert table_value(out, "chat template", "student") == "yes"
    assert re.fullmatch(r"the student's \(\d+ ids\)", table_value(out, "chat prompt ids"))
    assert "teacher 'math': chat template: its own template renders the prompt differently" not in err


def chat_model(path: Path, stop_ids: list[int]) -> Path:
    """The student's weights with a ChatML-like template that ends each turn with ``<|im_end|>``
    (id 99, a special token added to the char tokenizer) and generation_config.json's ``stop_ids``."""
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}assistant:"
    save_model(path, tokenizer=tok)
    (path / "generation_config.json").write_text(f'{{"bos_token_id": 1, "eos_token_id": {stop_ids}}}')
    return path


def test_end_of_turn_that_does_not_stop_generation_is_a_warning(tmp_path, capsys):
    """A chat template that ends turns with <|im_end|> while generation stops only on EOS: the
    responses would run on past the turn."""
    student, teacher = chat_model(tmp_path / "student", [2]), chat_model(tmp_path / "teacher", [2])
    status, out, err = check(capsys, *recipe(tmp_path, student, teacher))
    assert status == 0, err
    assert "mopd: warning: student: end of turn: <|im_end|> = 99 is not a stop id [2]" in err
    assert table_value(out, "special ids").endswith("<|im_end|> 99")


def test_a_teachers_own_template_must_render_ids_it_can_score(tmp_path, capsys):
    """teachers.<d>.chat_template: rendered with the teacher's tokenizer, a chat prompt must be ids
    that the teacher's output layer covers; 'own' without a template in the tokenizer is refused."""
    student, teacher = chat_model(tmp_path / "student", [2, 99]), chat_model(tmp_path / "teacher", [2, 99])
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}answer:")
    status, out, err = check(capsys, *recipe(tmp_path, student, teacher, chat_template=str(good)))
    assert status == 0, err
    assert re.fullmatch(r".*good\.jinja: the chat prompt is \d+ ids, all < 128", table_value(out, "own chat template"))
    status, out, err = check(capsys, *recipe(tmp_path, student, teacher, chat_template="own"))
    assert status == 0 and "own chat template" in out, err
    plain = chat_model(tmp_path / "plain", [2, 99])  # the same tokenizer without its chat template
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    for f in plain.glob("*chat_template*"):
        f.unlink()
    tok.save_pretrained(plain)
    line = refused(capsys, *recipe(tmp_path, student, plain, chat_template="own"))
    assert "teachers.math.chat_template is 'own' but the teacher's tokenizer has no chat template" in line


def test_end_of_turn_listed_in_generation_config(tmp_path, capsys):
    student, teacher = chat_model(tmp_path / "student", [2, 99]), chat_model(tmp_path / "teacher", [2, 99])
    status, out, err = check(capsys, *recipe(tmp_path, student, teacher))
    assert status == 0 and err == "", err
    assert table_value(out, "end of turn", "student") == "<|im_end|> = 99, a stop id"
    assert table_value(out, "stop ids") == "[2, 99], as the student's"
    assert re.fullmatch(r"the student's \(\d+ ids\)", table_value(out, "chat prompt ids"))


@pytest.mark.parametrize("command", ["check", "validate"])
def test_teacher_that_is_the_student_is_a_warning(command, models, tmp_path, capsys):
    """Its loss and gradient are exactly zero: a warning naming the teacher, not a refusal."""
    argv = recipe(tmp_path, models["student"], models["student"])
    capsys.readouterr()
    status = main([command, *argv])
    err = capsys.readouterr().err
    assert status == 0, err
    assert f"teacher 'math': not the student: its path {models['student']} is the student's" in err
    assert "exactly zero" in err and "set teachers.math.path" in err


def test_teacher_with_the_students_inline_config_is_a_warning(tmp_path, capsys):
    """Inline configs are built with run.seed for the student and every teacher: the same config
    is the same weights."""
    model = {"tokenizer": "builtin:char", "config": LLAMA}
    doc = {
        "run": {"total_steps": 1, "output_dir": str(tmp_path / "run")},
        "student": model,
        "teachers": {"math": model, "code": {**model, "config": {**LLAMA, "hidden_size": 64}}},
        "data": {"sources": [{"domain": "math", "generator": "math"}, {"domain": "code", "generator": "code"}]},
    }
    OmegaConf.save(OmegaConf.create(doc), tmp_path / "recipe.yaml")
    status, _, err = check(capsys, str(tmp_path / "recipe.yaml"))
    assert status == 0, err
    assert err.splitlines() == [
        "mopd: warning: teacher 'math': not the student: its inline config and seed are the student's: it scores "
        "every token as the student does, so its reverse KL, loss and gradient are exactly zero and the run learns "
        "nothing from it (set teachers.math.path to the teacher's own checkpoint)"
    ]


def test_train_refuses_other_stop_ids_before_ray(models, tmp_path, capsys, monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray started for a run that should have been refused before any actor")

    monkeypatch.setattr(run_module, "init_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    teacher = tmp_path / "teacher"
    shutil.copytree(models["other"], teacher)
    (teacher / "generation_config.json").write_text('{"eos_token_id": 7}')
    capsys.readouterr()
    assert main(["train", *recipe(tmp_path, models["student"], teacher)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mopd: error: teacher 'math': stop ids: [2, 7]") and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- --models


def reverse_kl(out: str) -> float:
    return float(table_value(out, "reverse KL").split()[0])


def test_models_reverse_kl_is_zero_for_the_students_weights(models, tmp_path, capsys):
    """The student's weights at another path: no path warning, but a reverse KL of ~0 (and a
    warning that this teacher gives no signal)."""
    status, out, err = check(capsys, *recipe(tmp_path, models["student"], models["copy"]), "--models")
    assert status == 0, err
    assert abs(reverse_kl(out)) < 1e-4
    assert "teacher 'math': reverse KL:" in err and "no signal" in err
    assert table_value(out, "replicas agree") == "1 replica: nothing to compare"


def test_models_reverse_kl_is_positive_for_another_teacher(models, tmp_path, capsys):
    status, out, err = check(
        capsys, *recipe(tmp_path, models["student"], models["sharp"]), "--models", "--prompts", "2"
    )
    assert status == 0, err
    assert reverse_kl(out) > 0.5  # a peaked random teacher against a near-uniform student: nats
    assert "tokens of 2 prompts" in table_value(out, "reverse KL")


def test_models_replicas_agree(models, tmp_path, capsys):
    status, out, err = check(capsys, *recipe(tmp_path, models["student"], models["other"], replicas=2), "--models")
    assert status == 0, err
    agree = table_value(out, "replicas agree")
    hashes = re.search(r"weights sha256 (\w+) / (\w+)", agree)
    assert hashes and hashes.group(1) == hashes.group(2)


def test_models_replicas_that_load_different_weights(models, tmp_path, capsys):
    """A checkpoint without its lm_head: transformers initialises it at random on every load, so
    two replicas of one teacher score the same tokens differently."""
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(models["other"], teacher)
    weights = load_file(teacher / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    line = refused(capsys, *recipe(tmp_path, models["student"], teacher, replicas=2), "--models")
    assert line.startswith("mopd: error: teacher 'math': replicas agree: two loads: weights sha256")
    assert "(tolerance 0.05)" in line and "every replica loads the same complete checkpoint" in line


# Extended: an engine start (~30 s on an idle machine, 3 min on a loaded one) for what
# tests/test_teachers_vllm.py already covers by default (hf and vllm scores agree).
@pytest.mark.vllm
@pytest.mark.extended
def test_models_hf_and_vllm_agree(models, tmp_path, capsys):
    """--vllm scores the student's samples with the teacher's vLLM engine too (float32 on both)."""
    status, out, err = check(capsys, *recipe(tmp_path, models["student"], models["other"]), "--models", "--vllm")
    assert status == 0, err
    agree = table_value(out, "hf vs vllm")
    diff = float(re.search(r"max \|diff log p\| (\S+) nats", agree).group(1))
    assert diff < 1e-3 and "(tolerance 0.05)" in agree
