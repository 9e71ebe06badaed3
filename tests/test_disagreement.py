"""scripts/disagreement.py: the per-position figures it prints for a student and its teacher."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mopd.config import ModelConfig
from mopd.models import load_model, tiny_mimo_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "disagreement.py"


def _script():
    spec = importlib.util.spec_from_file_location("disagreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_teacher_equal_to_the_student_agrees_everywhere_with_no_gradient():
    model = load_model(ModelConfig(config=tiny_mimo_config(), tokenizer="builtin:char"), seed=0).eval()
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    stats = _script().position_stats(model, model, ids, prompt_len=6)
    assert len(stats) == 6 and all(where == "agree" for where, _ in stats)
    for _, fig in stats:
        assert abs(fig["reverse KL"]) < 1e-5 and fig["|grad reverse KL|"] < 1e-5 and fig["|grad forward KL|"] < 1e-5


def test_another_teacher_disagrees_somewhere():
    cfg = ModelConfig(config=tiny_mimo_config(), tokenizer="builtin:char")
    student, teacher = load_model(cfg, seed=0).eval(), load_model(cfg, seed=1).eval()
    ids = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(0))
    stats = _script().position_stats(student, teacher, ids, prompt_len=6)
    disagree = [fig for where, fig in stats if where == "disagree"]
    assert disagree and all(f["reverse KL"] > 0 and 0 <= f["p_student(teacher token)"] <= 1 for f in disagree)
