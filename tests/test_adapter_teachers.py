"""Adapter teachers (``teachers.<d>.adapter`` over ``path``): teachers that are PEFT LoRA adapters
of one base are served by one worker group holding the base once; a batch that mixes their domains
goes through one forward, each row through its domain's adapter (PEFT's mixed batch). Their scores
equal those of each adapter merged into a full model.

    OMP_NUM_THREADS=1 pytest tests/test_adapter_teachers.py     # ~15 s
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mopd.config import ConfigError, TeacherConfig, load_config, teacher_groups
from mopd.models import build_char_tokenizer
from teachers.hf import HFTeacherWorker
from teachers.pool import TeacherPool
from test_check import recipe, save_model
from test_teachers import ATOL, PROMPTS, RESPONSES, assert_topk_of, make_batch, reference_full_logprobs

K = 5
DOMAINS = ["code", "math", "code", "math", "math", "code"]


def save_adapter(base: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """A LoRA adapter of ``base`` with random (non-zero) weights, and the adapter merged into a full
    model: the reference an adapter teacher must score as."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    for p in model.parameters():  # big enough to move the log-probs by more than rounding
        if p.requires_grad:
            p.data.mul_(4.0)
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged")
    build_char_tokenizer().save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    base = save_model(root / "base", seed=0)
    out = {"base": base}
    for i, d in enumerate(("math", "code")):
        out[d], out[f"{d}_merged"] = save_adapter(base, root / d, seed=10 + i)
    return out


def adapter_cfg(models, domain: str, **keys) -> TeacherConfig:
    return TeacherConfig(path=str(models["base"]), adapter=str(models[domain]), batch_size=4, **keys)


def merged_scores(models, batch, topk: int):
    """Each row scored by its own domain's merged model."""
    out = {}
    for d in ("math", "code"):
        w = HFTeacherWorker(d, TeacherConfig(path=str(models[f"{d}_merged"])), 0, set_threads=False)
        out[d] = (w.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk), w.model)
    return out


def assert_rows_match(got, refs, batch, domains) -> None:
    mask = batch.response_mask
    for i, d in enumerate(domains):
        ref, model = refs[d]
        torch.testing.assert_close(got.logprobs[i], ref.logprobs[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(got.topk_logprobs[i], ref.topk_logprobs[i], atol=ATOL, rtol=0)
        full = reference_full_logprobs(model, batch)[i : i + 1]
        assert_topk_of(got.topk_ids[i : i + 1], got.topk_logprobs[i : i + 1], full, mask[i : i + 1], ATOL)


@pytest.fixture(scope="module")
def batch():
    return make_batch(PROMPTS, RESPONSES, DOMAINS)


def test_one_worker_scores_a_mixed_batch_as_the_merged_teachers(models, batch):
    cfg = adapter_cfg(models, "math")
    w = HFTeacherWorker(
        "code+math", cfg, 0, set_threads=False, adapters={"math": str(models["math"]), "code": str(models["code"])}
    )
    got = w.score(batch.input_ids, batch.attention_mask, batch.response_mask, K, domains=DOMAINS)
    refs = merged_scores(models, batch, K)
    assert_rows_match(got, refs, batch, DOMAINS)
    # Not the base's scores, nor one adapter's for all rows: each row went through its own.
    assert (got.logprobs - refs["math"][0].logprobs)[torch.tensor([d == "code" for d in DOMAINS])].abs().max() > 1e-3
    with pytest.raises(ValueError, match="serves 2 adapters: score needs each row's domain"):
        w.score(batch.input_ids, batch.attention_mask, batch.response_mask)
    with pytest.raises(ValueError, match="has no adapter for agent"):
        w.score(batch.input_ids, batch.attention_mask, batch.response_mask, domains=["agent"] * len(DOMAINS))


@pytest.mark.parametrize("keys", [{"max_tokens_per_batch": 64}, {"max_tokens_per_batch": 64, "pack_sequences": True}])
def test_token_budget_and_packed_passes_keep_each_row_on_its_adapter(models, batch, keys):
    """Packed rows go through one adapter a pass (the domains are split), budget passes mix them."""
    cfg = adapter_cfg(models, "math", **keys)
    adapters = {"math": str(models["math"]), "code": str(models["code"])}
    w = HFTeacherWorker("code+math", cfg, 0, set_threads=False, adapters=adapters)
    got = w.score(batch.input_ids, batch.attention_mask, batch.response_mask, K, domains=DOMAINS)
    assert_rows_match(got, merged_scores(models, batch, K), batch, DOMAINS)


def test_a_lone_adapter_teacher_needs_no_domains(models, batch):
    w = HFTeacherWorker("math", adapter_cfg(models, "math"), 0, set_threads=False)
    got = w.score(batch.input_ids, batch.attention_mask, batch.response_mask, K)
    assert_rows_match(got, merged_scores(models, batch, K), batch, ["math"] * len(DOMAINS))


def test_the_pool_serves_adapters_of_one_base_from_one_worker(models):
    """math and code (adapters of the base) share one worker; agent (a full teacher) has its own.
    Per-domain metrics and the vocabulary check work as for full teachers."""
    teachers = {
        "math": adapter_cfg(models, "math"),
        "code": adapter_cfg(models, "code"),
        "agent": TeacherConfig(path=str(models["math_merged"])),
    }
    assert [(g.name, g.domains) for g in teacher_groups(teachers)] == [
        ("agent", ("agent",)),
        ("code+math", ("code", "math")),
    ]
    pool = TeacherPool(teachers, 0, local=True, max_topk=K)
    try:
        assert len(pool._actors) == 2 and pool.worker("math") is pool.worker("code")
        domains = ["agent", "math", "code", "math", "agent", "code"]
        b = make_batch(PROMPTS, RESPONSES, domains)
        scores, metrics = pool.score(b, topk=K)
        refs = merged_scores(models, b, K)
        refs["agent"] = refs["math"]  # agent's full teacher is math's merged model
        assert_rows_match(scores, refs, b, domains)
        assert {metrics[f"teacher/{d}/rows"] for d in ("math", "code", "agent")} == {2.0}
        assert metrics["teacher/math/latency_s"] == metrics["teacher/code/latency_s"]  # one call
        assert set(pool.signatures) == {"math", "code", "agent"}
    finally:
        pool.shutdown()


def test_the_base_is_held_once(models):
    """The adapter group's worker holds the base's parameters once plus the two adapters'."""
    adapters = {"math": str(models["math"]), "code": str(models["code"])}
    w = HFTeacherWorker("code+math", adapter_cfg(models, "math"), 0, set_threads=False, adapters=adapters)
    full = HFTeacherWorker("math", TeacherConfig(path=str(models["math_merged"])), 0, set_threads=False)
    base = sum(p.numel() for p in full.model.parameters())
    lora = sum(p.numel() for n, p in w.model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in w.model.parameters()) == base + lora and 0 < lora < base / 4


def test_mopd_check_and_plan_take_an_adapter_teacher(models, tmp_path, capsys):
    from mopd.dist.plan import adapter_params, plan_recipe
    from test_check import check, table_value

    args = recipe(tmp_path, models["base"], models["base"], adapter=str(models["math"]))
    status, out, err = check(capsys, *args)
    assert status == 0 and "warn" not in out, out + err  # the adapter makes it another model than its base
    assert table_value(out, "not the student").startswith(f"adapter {models['math']} over ")
    cfg = load_config(args[0], [])
    (actor,) = [a for a in plan_recipe(cfg, gpu_memory_gb=80).actors if a.name == "teachers.math"]
    two = replace(cfg, teachers={"math": cfg.teachers["math"], "code": adapter_cfg(models, "code")})
    (group,) = [a for a in plan_recipe(two, gpu_memory_gb=80).actors if a.name.startswith("teachers.")]
    assert group.name == "teachers.code+math" and "2 adapters over one base" in group.note
    assert group.parts["weights"] - actor.parts["weights"] == 4 * adapter_params(str(models["code"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teachers.math.adapter=/nowhere"], "not a PEFT adapter directory (no adapter_config.json): /nowhere"),
        (["teachers.math.backend=vllm"], "adapter teachers run on the hf backend, not vllm (vLLM's prompt log-probs"),
        (
            ["teachers.code.replicas=2"],
            "are adapters of one base, served by one worker group, but their replicas differ",
        ),
    ],
)
def test_adapter_settings_are_checked_with_the_recipe(models, tmp_path, overrides, message):
    args = recipe(tmp_path, models["base"], models["base"], adapter=str(models["math"]))
    code = [f"teachers.code.path={models['base']}", f"teachers.code.adapter={models['code']}"]
    sources = ", ".join(f"{{domain: {d}, generator: {d}, num_prompts: 8}}" for d in ("math", "code"))
    data = [f"data.sources=[{sources}]"]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(args[0], [*code, *data, *overrides])


def test_resume_tells_adapter_and_remote_teachers_apart(models, tmp_path):
    """A checkpoint records its teachers (``teacher_fingerprint``): another adapter over the same
    base, or another server, is another teacher set; a full teacher's record is as before."""
    import hashlib

    from mopd.config import MOPDConfig, RemoteConfig
    from mopd.loop import teacher_fingerprint

    def fingerprint(t: TeacherConfig) -> str:
        cfg = MOPDConfig()
        cfg.teachers = {"math": t}
        return teacher_fingerprint(cfg)["math"]

    base = str(models["base"])
    full = fingerprint(TeacherConfig(path=base))
    assert full == hashlib.sha256(str(models["base"].resolve()).encode()).hexdigest()[:16] + f" ({base})"
    math, code = (fingerprint(adapter_cfg(models, d)) for d in ("math", "code"))
    assert len({full, math, code}) == 3 and math.endswith(f"(adapter {models['math']} over {base})")
    a, b = (
        fingerprint(TeacherConfig(path=base, backend="remote", remote=RemoteConfig(url=u, model="m")))
        for u in ("http://a:8000/v1", "http://b:8000/v1")
    )
    assert a != b and a.endswith("(m at http://a:8000/v1)")
