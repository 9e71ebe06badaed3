"""The recipe schema: every shipped recipe validates, and each misconfiguration says what to fix."""

from pathlib import Path

import pytest

from mopd.app import cli
from mopd.config import ConfigError, MOPDConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "recipes").rglob("*.yml"))


def test_recipes_exist():
    assert len(RECIPES) >= 2, RECIPES


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(recipe, tmp_path, monkeypatch):
    from test_production_recipes import PRODUCTION, standin_overrides
    from test_real_model import standin_cache

    # recipes/real_small.yaml reads $MOPD_CACHE (scripts/real_model.py writes it): stand-ins there.
    monkeypatch.setenv("MOPD_CACHE", str(standin_cache(tmp_path / "cache")))
    # Production recipes name checkpoints by placeholder paths: tiny stand-ins replace them.
    cfg = load_config(recipe, standin_overrides(recipe, tmp_path) if recipe.name in PRODUCTION else None)
    assert isinstance(cfg, MOPDConfig)
    assert cfg.teachers and cfg.data.sources


@pytest.fixture
def recipe(tmp_path):
    """A minimal valid recipe on a jsonl file, written to tmp_path."""
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1="}\n')
    path = tmp_path / "r.yaml"
    path.write_text(
        f"""
run: {{total_steps: 2}}
student: {{path: {tmp_path}, tokenizer: builtin:char}}
teachers:
  math: {{path: {tmp_path}, tokenizer: builtin:char}}
  code: {{path: {tmp_path}, tokenizer: builtin:char}}
data:
  sources:
    - {{domain: math, path: {data}}}
"""
    )
    return path


def _error(path, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_minimal_recipe_loads_with_defaults(recipe):
    cfg = load_config(recipe, ["trainer.lr=3e-4", "rollout.n=8"])
    assert cfg.trainer.lr == 3e-4 and cfg.rollout.n == 8
    assert cfg.objective.eps_low == 0.5 and cfg.objective.eps_high == 5.0
    assert cfg.run.output_dir == "runs/mopd"  # interpolated from run.name


def test_unknown_key_names_nearest_valid_keys(recipe):
    msg = _error(recipe, "trainer.lrr=1")
    assert "unknown key 'trainer.lrr'" in msg and "did you mean 'lr'" in msg and "zero_stage" in msg


def test_unknown_key_inside_teacher_entry(recipe):
    msg = _error(recipe, "teachers.math.replica=2")
    assert "did you mean 'replicas'" in msg and "teachers.<domain>" in msg


def test_unknown_top_level_section(recipe):
    msg = _error(recipe, "trainr.lr=1")
    assert "unknown key 'trainr" in msg and "'trainer'" in msg


def test_wrong_type(recipe):
    msg = _error(recipe, "rollout.n=four")
    assert "wrong type" in msg and "rollout.n" in msg


def test_missing_required_value(tmp_path, recipe):
    text = recipe.read_text().replace("run: {total_steps: 2}", "run: {name: x}")
    recipe.write_text(text)
    msg = _error(recipe)
    assert "missing required value: run.total_steps" in msg


def test_domain_without_teacher_names_configured_teachers(recipe, tmp_path):
    data = tmp_path / "law.jsonl"
    data.write_text('{"prompt": "x"}\n')
    msg = _error(recipe, f"data.sources=[{{domain: law, path: {data}}}]")
    assert "no teacher for domain 'law'; configured teachers: code, math" in msg


def test_eps_low_not_below_eps_high(recipe):
    msg = _error(recipe, "objective.eps_low=5.0", "objective.eps_high=5.0")
    assert "objective.eps_low (5.0) must be > 0 and < objective.eps_high (5.0)" in msg


@pytest.mark.parametrize(
    "override,name",
    [
        ("rollout.n=0", "rollout.n"),
        ("rollout.prompts_per_step=-1", "rollout.prompts_per_step"),
        ("trainer.world_size=0", "trainer.world_size"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
        ("teachers.math.replicas=0", "teachers.math.replicas"),
        ("run.total_steps=0", "run.total_steps"),
        ("rollout.weight_sync_bucket_mb=0", "rollout.weight_sync_bucket_mb"),
    ],
)
def test_non_positive_sizes(recipe, override, name):
    assert f"{name} must be positive" in _error(recipe, override)


def test_missing_data_file(recipe):
    msg = _error(recipe, "data.sources=[{domain: math, path: /nonexistent/math.jsonl}]")
    assert "data.sources[0].path: file or directory does not exist: /nonexistent/math.jsonl" in msg


def test_missing_model_dir(recipe):
    msg = _error(recipe, "teachers.code.path=/nonexistent/teacher")
    assert "teachers.code.path: file or directory does not exist: /nonexistent/teacher" in msg


def test_missing_recipe_file(tmp_path):
    assert "recipe file not found" in _error(tmp_path / "nope.yaml")


def test_bad_choice_names_valid_options(recipe):
    assert "rollout.backend is 'sglang'; valid: hf, vllm" in _error(recipe, "rollout.backend=sglang")
    assert "objective.kind is 'full'; valid: sampled, topk" in _error(recipe, "objective.kind=full")
    assert "teachers.code.backend is 'trt'; valid: hf, vllm, remote" in _error(recipe, "teachers.code.backend=trt")
    assert "trainer.lr_schedule is 'wsd'; valid: constant, linear, cosine" in _error(recipe, "trainer.lr_schedule=wsd")
    assert "data.on_bad_row is 'drop'; valid: reject, skip" in _error(recipe, "data.on_bad_row=drop")
    assert "student.dtype is 'int8'; valid: float32, bfloat16, float16" in _error(recipe, "student.dtype=int8")
    assert "trainer.zero_stage is 4; valid: 0, 1, 2, 3" in _error(recipe, "trainer.zero_stage=4")
    assert "rollout.weight_sync is 'nccl'; valid: direct, driver" in _error(recipe, "rollout.weight_sync=nccl")


def test_bad_choice_in_a_recipe_file_names_the_file_the_key_and_the_choices(recipe):
    recipe.write_text(recipe.read_text() + "objective: {kind: full}\n")
    assert _error(recipe) == f"{recipe}: objective.kind is 'full'; valid: sampled, topk"


def test_cli_validate_reports_a_bad_choice_on_one_line(recipe, capsys):
    assert cli.main(["validate", str(recipe), "objective.kind=full"]) == 2
    assert capsys.readouterr().err == "mopd: error: override: objective.kind is 'full'; valid: sampled, topk\n"


@pytest.mark.parametrize("key", ["run.log_every=5", "eval.greedy=false", "eval.max_new_tokens=8"])
def test_settings_nothing_read_are_gone(recipe, key):
    """run.log_every, eval.greedy and eval.max_new_tokens were validated and never read: removed
    (eval is greedy accuracy with the rollout's max_new_tokens, as the report and docs say)."""
    assert f"unknown key '{key.partition('=')[0]}'" in _error(recipe, key)


def test_topk_with_an_outcome_advantage_is_refused(recipe):
    msg = _error(recipe, "objective.kind=topk", "objective.alpha=0.5")
    assert "objective.alpha=0.5 does nothing with objective.kind=topk" in msg
    assert "set objective.alpha=0, or objective.kind=sampled" in msg
    load_config(recipe, ["objective.kind=sampled", "objective.alpha=0.5"])  # math has a verifier


def test_outcome_advantage_needs_a_verifier_for_every_domain(recipe, tmp_path, monkeypatch):
    """A file-only domain has no verifier: refused before any actor starts (it used to die with a
    KeyError at step 1), until a plugin registers one."""
    import mopd.domains as registry

    registry.verifiers()  # the built-ins are in; the plugin's 'legal' is dropped after the test
    monkeypatch.setattr(registry, "_VERIFIERS", dict(registry._VERIFIERS))
    data = tmp_path / "legal.jsonl"
    data.write_text('{"prompt": "may I?"}\n')
    file_only = [
        f"teachers.legal={{path: {tmp_path}, tokenizer: 'builtin:char'}}",
        f"data.sources=[{{domain: math, path: {tmp_path / 'math.jsonl'}}}, {{domain: legal, path: {data}}}]",
    ]
    load_config(recipe, file_only)  # alpha = 0: no verifier needed
    msg = _error(recipe, *file_only, "objective.alpha=0.5")
    assert "domain 'legal' (data.sources[1]) has none" in msg and msg.count("needs a verifier") == 1
    assert "register one with mopd.domains.register_verifier in a module listed in run.plugins" in msg
    assert "or set objective.alpha=0" in msg
    plugin = tmp_path / "legal_verifier.py"
    plugin.write_text(
        "from mopd.domains import register_verifier\nregister_verifier('legal', lambda row, response: 0.0)\n"
    )
    load_config(recipe, [*file_only, "objective.alpha=0.5", f"run.plugins=[{plugin}]"])


def test_several_errors_reported_together(recipe):
    msg = _error(recipe, "rollout.n=0", "objective.eps_low=9")
    assert "rollout.n must be positive" in msg and "objective.eps_low" in msg


def test_cli_validate_prints_resolved_recipe(capsys):
    # A recipe whose models can be read: validate also runs train's checks before Ray
    # (tests/test_refusals.py), and the `recipe` fixture's model paths are empty directories.
    assert cli.main(["validate", str(ROOT / "recipes" / "tiny.yaml"), "trainer.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "eps_high: 5.0" in out


def test_cli_train_fails_before_any_actor_starts(recipe, capsys, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("ray.init called for an invalid recipe")

    monkeypatch.setattr(ray, "init", no_ray)
    assert cli.main(["train", str(recipe), "trainer.lrr=1"]) == 2
    assert "unknown key 'trainer.lrr'" in capsys.readouterr().err


def test_a_bad_choice_set_in_python_is_refused_by_validate():
    """OmegaConf checks Literal fields when a recipe is loaded; validate checks a config changed in code."""
    from mopd.config import validate

    cfg = load_config(ROOT / "recipes" / "tiny.yaml")
    cfg.objective.kind = "topK"
    cfg.teachers[next(iter(cfg.teachers))].backend = "vLLM"
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "objective.kind is 'topK'; valid: sampled, topk" in str(e.value)
    assert ".backend is 'vLLM'; valid: hf, vllm" in str(e.value)


@pytest.mark.parametrize("recipe", ["tiny.yaml", "quickstart.yaml"])
def test_the_recipes_tiny_student_is_the_one_tests_build(recipe):
    """The tiny MiMoV2Flash student is written out in the CPU recipes (a recipe states its model)
    and built by ``models.tiny_mimo_config`` in tests and scripts: one model, pinned here so the
    copies cannot drift apart."""
    from transformers import AutoConfig

    from mopd.models import tiny_mimo_config

    def built(cfg: dict) -> dict:
        cfg = dict(cfg)
        out = AutoConfig.for_model(cfg.pop("model_type"), **cfg).to_dict()
        out.pop("transformers_version", None)
        return out

    assert built(load_config(ROOT / "recipes" / recipe).student.config) == built(tiny_mimo_config())


def test_token_budget_settings_are_checked(recipe):
    assert "trainer.max_tokens_per_micro_batch must be >= 0, got -1" in _error(
        recipe, "trainer.max_tokens_per_micro_batch=-1"
    )
    msg = _error(recipe, "teachers.code.backend=vllm", "teachers.code.pack_sequences=true")
    assert "teachers.code.max_tokens_per_batch and pack_sequences apply to the hf backend" in msg
