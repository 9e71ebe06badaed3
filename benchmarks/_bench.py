"""Shared set-up of the throughput benchmarks (``vs_trl.py``, ``step_phases.py``,
``rollout_engines.py``): the benchmark-size student and teacher saved as Hugging Face directories,
the MOPD recipe of a run, the prompt stream a run sees, the held-out quality measures, and the
machine description written next to every figure.

Not a test and not part of the package: the scripts import it from their own folder.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig, load_config
from mopd.models import CHAR_VOCAB_SIZE, build_char_tokenizer, load_model
from mopd.types import PromptRow

# Student: Qwen3-MoE, 6 layers, 8 experts top-2 (10.7M parameters, 3.6M active per token).
STUDENT = dict(
    model_type="qwen3_moe", vocab_size=CHAR_VOCAB_SIZE, hidden_size=256, intermediate_size=512,
    moe_intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
    max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip
# Teacher: dense Qwen3, 4 layers (3.2M parameters).
TEACHER = dict(
    model_type="qwen3", vocab_size=CHAR_VOCAB_SIZE, hidden_size=256, intermediate_size=768,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip
# A random teacher is near-uniform, so every student would already sit close to it; scaling its
# output layer gives it peaked next-token distributions that a student has to learn.
TEACHER_SHARPEN = 8.0


def add_workload_args(p) -> None:
    """The workload options every MOPD benchmark shares (an ``argparse.ArgumentParser``)."""
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--rollout-replicas", type=int, default=1)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--overlap", action="store_true", help="rollout.overlap: generate step k+1 while step k trains")
    p.add_argument(
        "--zero-stage", type=int, default=None,
        help="trainer.zero_stage (default: 0 for one trainer rank, which has nothing to partition; 2 for more)",
    )  # fmt: skip


def zero_stage(args) -> int:
    """The ZeRO stage a user would pick: 0 on one rank (same update, no ZeRO bucket copies), else 2."""
    if getattr(args, "zero_stage", None) is not None:
        return int(args.zero_stage)
    return 0 if args.world_size == 1 else 2


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def active_params(config: dict[str, Any], total: int) -> int:
    """Parameters a token passes through: all but the inactive experts (and the input embedding)."""
    emb = config["vocab_size"] * config["hidden_size"]
    if "num_experts" not in config:
        return total - emb
    h, f = config["hidden_size"], config["moe_intermediate_size"]
    inactive = config["num_hidden_layers"] * (config["num_experts"] - config["num_experts_per_tok"]) * 3 * h * f
    return total - emb - inactive


def save_models(work: Path, seed: int = 0) -> dict[str, Any]:
    """Build the student and the teacher from config (random init, seeded) and save both as
    Hugging Face directories with the character tokenizer; cached in ``work``."""
    info_path = work / "models.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    tok = build_char_tokenizer()
    info: dict[str, Any] = {}
    for name, config, s in (("student", STUDENT, seed), ("teacher", TEACHER, seed + 1)):
        model = load_model(ModelConfig(config=dict(config), tokenizer=BUILTIN_TOKENIZER), seed=s)
        if name == "teacher":
            with torch.no_grad():
                model.lm_head.weight.mul_(TEACHER_SHARPEN)
        out = work / name
        model.save_pretrained(out)
        tok.save_pretrained(out)
        total = count_params(model)
        info[name] = {
            "path": str(out),
            "params": total,
            "active_params": active_params(config, total),
            "config": config,
        }
    info_path.write_text(json.dumps(info, indent=2))
    return info


def recipe(
    work: Path, models: dict[str, Any], args, name: str, domains: tuple[str, ...] = ("math",), **extra: Any
) -> Path:
    """The MOPD recipe of a benchmark run as a YAML file (the exact per-position reverse KL
    objective, i.e. TRL's beta=1 loss, no MoE balance loss). One teacher per domain of ``domains``,
    each the benchmark teacher, each domain's prompts from the ``math`` generator."""
    teacher = f"{{path: {models['teacher']['path']}, tokenizer: {BUILTIN_TOKENIZER}, batch_size: 64}}"
    teachers = "".join(f"\n  {d}: {teacher}" for d in domains)
    sources = ", ".join(f"{{domain: {d}, generator: math, num_prompts: 2000}}" for d in domains)
    lines = f"""
run: {{name: {name}, output_dir: {work / name}, total_steps: {args.steps}, seed: {args.seed}}}
student: {{path: {models["student"]["path"]}, tokenizer: {BUILTIN_TOKENIZER}}}
teachers:{teachers}
data:
  sources: [{sources}]
rollout: {{n: {args.n}, prompts_per_step: {args.prompts}, max_new_tokens: {args.max_new},
  replicas: {args.rollout_replicas}, overlap: {str(args.overlap).lower()}}}
trainer: {{world_size: {args.world_size}, zero_stage: {zero_stage(args)}, lr: {args.lr},
  micro_batch_size: {args.micro_batch},
  aux_loss_coef: 0.0}}
objective: {{kind: topk, topk: {CHAR_VOCAB_SIZE}}}
eval: {{every: 0}}
checkpoint: {{every: 0, keep: 1}}
"""
    for key, value in extra.items():
        lines += f"{key}: {json.dumps(value)}\n"
    path = work / f"{name}.yaml"
    path.write_text(lines.lstrip())
    return path


def prompt_stream(recipe_path: Path, steps: int) -> list[list[PromptRow]]:
    """The prompts a ``mopd train`` of this recipe draws, step by step (same mixer, same seed)."""
    from mopd.app.run import build_mixer

    cfg = load_config(recipe_path)
    mixer, _ = build_mixer(cfg)
    return [mixer.next_batch(cfg.rollout.prompts_per_step) for _ in range(steps)]


def eval_rows(recipe_path: Path, num: int) -> list[PromptRow]:
    """Held-out prompts: the math generator's eval split (disjoint from the training prompts)."""
    from mopd.app.run import build_eval_rows

    cfg = load_config(recipe_path, ["eval.every=1", f"eval.num_prompts={num}"])
    return build_eval_rows(cfg)


def run_mopd(recipe_path: Path, overrides: list[str] | None = None, log: Path | None = None) -> dict[str, Any]:
    """``mopd train`` in a child process (its Ray starts and stops with it). Returns the wall time
    of the whole command and the per-step records of its metrics.jsonl."""
    from mopd.metrics import read_metrics

    cfg = load_config(recipe_path, overrides or [])
    out = Path(cfg.run.output_dir)
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    cmd = ["mopd", "train", str(recipe_path), *(overrides or [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    with open(log or os.devnull, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "timing/rollout" in r]
    return {"start": t0, "wall_s": wall, "records": records, "output_dir": str(out)}


def mopd_steady(run: dict[str, Any], warmup: int = 1) -> dict[str, Any]:
    """Steady-state figures of a ``run_mopd`` result: steps after ``warmup`` are timed by the gaps
    between consecutive metric records (everything the driver did, writer included)."""
    recs = run["records"]
    times = [run["start"]] + [r["time"] for r in recs]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    steady = list(range(warmup, len(recs)))
    wall = sum(gaps[i] for i in steady)
    tokens = sum(recs[i]["rollout/tokens"] for i in steady)
    first_step = recs[0].get("timing/step", gaps[0])
    return {
        "startup_s": gaps[0] - first_step,  # command start to the start of step 1
        "first_step_s": first_step,
        "steady_steps": len(steady),
        "steady_wall_s": wall,
        "step_s": wall / max(len(steady), 1),
        "response_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else float("nan"),
        "gaps": gaps,
    }


# ---------------------------------------------------------------------- quality


@torch.no_grad()
def quality(
    student_dir: str, teacher_dir: str, rows: list[PromptRow], max_new: int, seed: int = 1234
) -> dict[str, float]:
    """Held-out quality of a student: greedy exact-match accuracy (the domain's verifier) and the
    per-token reverse KL(student || teacher) over the full vocabulary on the student's own sampled
    responses (temperature 1, seeded), the quantity both toolkits minimise."""
    from mopd.domains import get_verifier
    from mopd.models import forward_logits
    from rollout.hf import HFRolloutActor

    cfg = MOPDConfig()
    cfg.student = ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)
    cfg.rollout.max_new_tokens = max_new
    actor = HFRolloutActor(cfg)
    greedy = actor.generate(rows, 1, seed=seed, greedy=True)
    acc = sum(
        get_verifier(r.domain).verify(r, resp) for r, resp in zip(greedy.rows, greedy.responses, strict=True)
    ) / len(rows)
    sampled = actor.generate(rows, 1, seed=seed)
    teacher = load_model(ModelConfig(path=teacher_dir, tokenizer=BUILTIN_TOKENIZER)).eval()
    ids, am, rm = sampled.input_ids, sampled.attention_mask, sampled.response_mask
    ls = torch.log_softmax(forward_logits(actor.model, ids, am).logits[:, :-1].float(), -1)
    lt = torch.log_softmax(forward_logits(teacher, ids, am).logits[:, :-1].float(), -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)  # (B, T-1): distribution of token t+1
    mask = rm[:, 1:]
    return {"accuracy": acc, "reverse_kl": float(kl[mask].mean()), "eval_tokens": int(mask.sum())}


# ---------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    import transformers

    load = os.getloadavg()
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}")


# ---------------------------------------------------------------------- spread-length student

# Reasoning-like filler of the spread-length SFT targets: letters and spaces only, so that '=' and
# the answer's digits mark where a response ends.
SPREAD_FILLER = "let me think this through step by step and check each part of it again "


def spread_target(rng, answer: str, max_new: int, filler: str = SPREAD_FILLER) -> str:
    """An SFT target whose length (EOS included) is drawn uniformly from what fits ``max_new``
    tokens: filler, then ``=`` and the answer (the character tokenizer: one token a character)."""
    tail = "=" + answer
    length = rng.randint(len(tail) + 1, max_new)  # response tokens, EOS included
    fill = length - len(tail) - 1
    return (filler * (fill // len(filler) + 1))[:fill] + tail


def spread_sft(
    src: str, out: Path, max_new: int, steps: int = 100, batch: int = 16, lr: float = 1e-3, seed: int = 0,
    noisy_answers: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """SFT the model in ``src`` on ``math`` training prompts with ``spread_target`` targets (EOS at
    the end) and save it to ``out``: a plain fp32 AdamW loop on the target tokens (token mean),
    right-padded batches of ``batch`` rows. ``noisy_answers``: each answer replaced by random digits
    of its length (the format without the arithmetic). Returns the run's settings, time and losses."""
    import random

    from transformers import AutoModelForCausalLM

    from mopd.chat import prompt_ids
    from mopd.domains.math import generate

    rng = random.Random(seed + 17)
    torch.manual_seed(seed + 17)
    tok = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rows = generate(rng, steps * batch, "train")
    t0, losses = time.time(), []
    for step in range(steps):
        ids, labels = [], []
        for row in rows[step * batch : (step + 1) * batch]:
            p = prompt_ids(tok, row)
            answer = row.meta["answer"]
            if noisy_answers:
                answer = "".join(rng.choice("0123456789") for _ in answer)
            target = spread_target(rng, answer, max_new)
            r = [*tok(target, add_special_tokens=False)["input_ids"], tok.eos_token_id]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(map(len, ids))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"  spread SFT of {out.name}, step {step + 1}/{steps}: loss {sum(losses[-25:]) / 25:.3f}", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {
        "steps": steps, "batch": batch, "lr": lr, "max_new": max_new, "noisy_answers": noisy_answers,
        "seconds": round(time.time() - t0, 1),
        "loss_first": round(losses[0], 3), "loss_last10": round(sum(losses[-10:]) / min(10, len(losses)), 3),
    }  # fmt: skip


def spread_models(work: Path, models: dict[str, Any], max_new: int, steps: int = 100, seed: int = 0) -> dict[str, Any]:
    """``models`` with the student and the teacher replaced by copies SFT'd briefly (``spread_sft``)
    on targets that end with EOS at lengths drawn uniformly up to ``max_new``: the student's
    on-policy samples stop at spread-out lengths instead of running to the cap, and the teacher ends
    its responses the same way. The student's answers are random digits, the teacher's the real ones:
    what there is to distill. (A random teacher, or one with other filler wording, scores the
    student's text off its own distribution and pulled the student's responses down to a few tokens
    within 3-4 steps.) Cached in ``work``."""
    base = work / f"spread_{max_new}_{steps}_{seed}_v2"
    info_path = base / "models.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    info = json.loads(json.dumps(models))
    for name in ("student", "teacher"):
        out = base / name
        noisy = name == "student"
        info[name]["spread_sft"] = spread_sft(models[name]["path"], out, max_new, steps, seed=seed, noisy_answers=noisy)
        info[name]["path"] = str(out)
    info_path.write_text(json.dumps(info, indent=2))
    return info


def length_summary(lengths: list[int] | list[float], max_new: int) -> dict[str, float]:
    """Min / quartiles / median / max of response lengths, and the share at the cap."""
    xs = sorted(int(x) for x in lengths)
    if not xs:
        return {}
    q = lambda f: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
    return {
        "n": len(xs), "min": xs[0], "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "max": xs[-1],
        "mean": sum(xs) / len(xs), "at_cap": sum(x >= max_new for x in xs) / len(xs),
    }  # fmt: skip
