"""Safe defaults: no pickle loading in our code, safetensors-only weights, remote code off unless a
model entry turns it on, the local Ray dashboard off or on 127.0.0.1. See docs/reliability.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mopd.config import ModelConfig, MOPDConfig, load_config
from mopd.dist.runtime import local_ray_kwargs
from mopd.models import load_model

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mopd", "teachers", "rollout", "trainers", "scripts", "benchmarks")
TINY = {
    "model_type": "llama",
    "vocab_size": 128,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _calls(src: str, name: str):
    """The argument text of every call ``name(...)`` in ``src`` (balanced parentheses)."""
    for m in re.finditer(re.escape(name) + r"\(", src):
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        yield src[m.end() : i - 1]


def test_every_torch_load_is_weights_only():
    offenders = [
        f"{p.relative_to(ROOT)}: torch.load({args})"
        for p in _sources()
        for args in _calls(p.read_text(), "torch.load")
        if "weights_only=True" not in args
    ]
    assert offenders == []


def test_no_pickle_loading_or_hardwired_remote_code():
    bad = re.compile(r"pickle\.loads?\(|trust_remote_code\s*=\s*True")
    hits = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in _sources()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line)
    ]
    assert hits == []


def test_remote_code_is_off_by_default():
    cfg = MOPDConfig()
    assert ModelConfig().trust_remote_code is False and cfg.student.trust_remote_code is False
    recipe = load_config(str(ROOT / "recipes" / "tiny.yaml"))
    assert all(not t.trust_remote_code for t in recipe.teachers.values())


def _remote_code_dir(tmp_path: Path) -> Path:
    """A model directory whose config points at Python shipped with it (``auto_map``); that code
    leaves a marker file when it runs."""
    model = tmp_path / "model"
    model.mkdir()
    auto_map = {"AutoConfig": "probe_remote.ProbeConfig", "AutoModelForCausalLM": "probe_remote.ProbeModel"}
    (model / "config.json").write_text(json.dumps({**TINY, "auto_map": auto_map}))
    (model / "probe_remote.py").write_text(
        f"open({str(tmp_path / 'remote_code_ran')!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class ProbeConfig(LlamaConfig):\n    pass\n"
        "class ProbeModel(LlamaForCausalLM):\n    config_class = ProbeConfig\n"
    )
    return model


def test_remote_code_runs_only_when_the_model_entry_allows_it(tmp_path):
    model = _remote_code_dir(tmp_path)
    with pytest.raises(OSError):  # no weights; what matters is whose code got this far
        load_model(ModelConfig(path=str(model)))
    assert not (tmp_path / "remote_code_ran").exists()
    with pytest.raises(OSError):  # no weights here either, but the model's own code ran first
        load_model(ModelConfig(path=str(model), trust_remote_code=True))
    assert (tmp_path / "remote_code_ran").exists()


def test_weights_load_only_from_safetensors(tmp_path):
    model = load_model(ModelConfig(config=dict(TINY)))
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")  # the pickle format
    with pytest.raises(OSError, match="safetensors"):
        load_model(ModelConfig(path=str(tmp_path / "pickled")))
    model.save_pretrained(tmp_path / "safe")
    assert load_model(ModelConfig(path=str(tmp_path / "safe"))).config.hidden_size == 16


def test_local_ray_dashboard_is_off_or_loopback_only():
    cfg = MOPDConfig()
    kw = local_ray_kwargs(cfg, 2)
    assert kw["include_dashboard"] is False and kw["dashboard_host"] == "127.0.0.1"
    cfg.ray.include_dashboard = True
    assert local_ray_kwargs(cfg, 2)["dashboard_host"] == "127.0.0.1"
    # No idle workers started ahead of the actors (which set their own environment and never use them).
    assert local_ray_kwargs(cfg, 2)["_system_config"]["enable_worker_prestart"] is False
