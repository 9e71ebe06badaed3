"""The production recipes (recipes/qwen3_moe_*.yaml, recipes/mimo_v2_flash.yaml) pass `mopd validate`
and `mopd plan` with their checkpoint paths, the only edits a user makes, replaced by tiny stand-in
directories of the same model_type (a config.json and the builtin tokenizer: the plan loads no
weights), on the cluster each one names.

    pytest tests/test_production_recipes.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mopd.app.cli import main
from mopd.models import build_char_tokenizer, tiny_mimo_config

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "/path/to/"
QWEN3_MOE = dict(
    model_type="qwen3_moe", vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=4,
    num_experts_per_tok=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
# recipe -> (stand-in model config, cluster as `mopd plan` options, GPUs it asks for)
PRODUCTION = {
    "qwen3_moe_30b_a3b_1node.yaml": (QWEN3_MOE, ["--gpus", "8"], 8),
    "qwen3_moe_30b_a3b_multinode.yaml": (QWEN3_MOE, ["--nodes", "4", "--gpus", "8"], 30),
    "qwen3_moe_30b_a3b_32k.yaml": (QWEN3_MOE, ["--nodes", "4", "--gpus", "8"], 31),
    "mimo_v2_flash.yaml": (tiny_mimo_config(max_position_embeddings=4096), ["--nodes", "13", "--gpus", "8"], 104),
}


def standin_overrides(recipe: Path, root: Path) -> list[str]:
    """``key=DIR`` overrides replacing every placeholder checkpoint path of a production recipe by
    a tiny stand-in of the recipe's model_type, written under ``root``."""
    from transformers import AutoConfig

    model = dict(PRODUCTION[recipe.name][0])
    standin = root / model["model_type"]
    if not standin.exists():
        AutoConfig.for_model(model.pop("model_type"), **model).save_pretrained(standin)
        build_char_tokenizer().save_pretrained(standin)
    raw = OmegaConf.load(recipe)
    keys = ["student.path", *(f"teachers.{d}.path" for d in raw.teachers)]
    found = [k for k in keys if str(OmegaConf.select(raw, k)).startswith(PLACEHOLDER)]
    assert found == keys, f"{recipe.name}: every model path is a {PLACEHOLDER}... placeholder"
    return [f"{k}={standin}" for k in keys]


def test_the_production_recipes_are_listed():
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml") if PLACEHOLDER in p.read_text()}
    assert shipped == set(PRODUCTION)


@pytest.mark.parametrize("name", sorted(PRODUCTION))
def test_validate_and_plan_pass_with_standins(name, tmp_path, capsys):
    recipe = ROOT / "recipes" / name
    overrides = standin_overrides(recipe, tmp_path)
    assert main(["validate", str(recipe), *overrides]) == 0
    _, cluster, gpus = PRODUCTION[name]
    assert main(["plan", str(recipe), *overrides, *cluster]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"GPUs asked for: {gpus:g};" in out and out.rstrip().endswith("fits")
    # One node (or, on one node, one GPU) fewer than the recipe names is refused.
    i = cluster.index("--nodes" if "--nodes" in cluster else "--gpus") + 1
    smaller = [*cluster[:i], str(int(cluster[i]) - 1), *cluster[i + 1 :]]
    assert main(["plan", str(recipe), *overrides, *smaller]) == 2
    assert "but the cluster has" in capsys.readouterr().err
