"""MOPD vs TRL: the same on-policy distillation trained by ``mopd train`` and by TRL's
``DistillationTrainer``, on this CPU, one after the other, for the same number of steps.

Same student init (Qwen3-MoE, 10.7M parameters), same teacher (dense Qwen3, 3.2M), same character
tokenizer, same prompts in the same order (the ``math`` generator, as ``mopd train`` draws them),
same samples per prompt, response length, learning rate, optimizer (AdamW, constant LR, clip 1.0),
fp32, and the same loss: the exact per-position reverse KL over the vocabulary (``objective.kind:
topk`` with k = vocabulary size in MOPD; ``beta=1`` in TRL). Prints response tokens per second of
each (steady state: the first step and the start-up are excluded and reported apart) and the ratio
against TRL's fastest thread setting (``--trl-threads 2,1`` runs both), held-out quality of every
student (greedy exact-match accuracy and the per-token reverse KL to the teacher on the students'
own samples, also per wall-clock second of training), each TRL setting's generation and
non-generation time per step, and mopd's teacher scoring + train + sync (phases in turn) over each
TRL setting's non-generation time: the two toolkits' cost of the same update.

    pip install -c constraints-cpu.txt -e '.[bench]'          # TRL 1.16
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --steps 8 --out results/vs_trl.json
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --steps 8 --trl-threads 2,1 --also-overlap \
        --also 'rollout.backend=vllm rollout.overlap=true'

``--spread``: the same comparison on a workload whose responses end at spread-out lengths. Before
both runs the benchmark student and teacher are SFT'd briefly (``_bench.spread_models``) on targets
that end with EOS at lengths drawn uniformly up to ``--max-new`` (each with its own filler wording,
so there is still something to distill); both toolkits start from that student and use that teacher.
mopd runs with the recipe a user would pick for spread lengths: micro-batches by tokens
(``trainer.max_tokens_per_micro_batch`` and ``teachers.math.max_tokens_per_batch`` =
``--token-budget``, 2048 by default), with ``--overlap`` for ``rollout.overlap``. The script prints
the response lengths of step 1 for both toolkits (mopd's regenerated in-process with step 1's seed,
checked against the run's token count), the mean length of every step, and the share of computed
positions that were padding (mopd's ``train/padding_frac``; TRL pads every row to its generation
batch's longest).

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --spread --overlap --steps 8 --trl-threads 2,1 \
        --work runs/bench_spread --out results/vs_trl_spread.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import _bench
from mopd.types import PromptRow

# ---------------------------------------------------------------------- TRL side


def trl_dataset(stream: list[list[PromptRow]], n: int):
    """The prompt stream as a TRL dataset: each prompt n times in a row, steps in order (TRL's
    DistillationTrainer samples one completion per row, so n copies = n samples per prompt)."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r.prompt} for rows in stream for r in rows for _ in range(n)])


def run_trl(work: Path, models: dict[str, Any], stream, args) -> dict[str, Any]:
    """Train with TRL's DistillationTrainer; per-step wall times, generation times and response
    tokens recorded by a thin subclass."""
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from mopd.models import build_char_tokenizer

    record: dict[str, list[Any]] = {"step_end": [], "generate_s": [], "tokens": [], "lengths": [], "padding": []}

    class Timed(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            record["generate_s"].append(time.perf_counter() - t0)
            record["tokens"].append(float(out["completion_mask"].sum()))
            cm, pm = out["completion_mask"], out["prompt_mask"]
            record["lengths"].append([int(x) for x in cm.sum(1)])
            # Positions of the padded batch (every pass keeps its generation batch's width) that are padding.
            record["padding"].append(1.0 - float(cm.sum() + pm.sum()) / (cm.numel() + pm.numel()))
            return out

    class StepClock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            record["step_end"].append(time.time())

    torch.set_num_threads(int(args.trl_threads))
    rows_per_step = args.prompts * args.n
    config = DistillationConfig(
        output_dir=str(work / f"trl_{args.trl_threads}t"), max_steps=args.steps,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=rows_per_step // args.micro_batch,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, bf16=False, gradient_checkpointing=False,
        max_completion_length=args.max_new, temperature=1.0, top_p=1.0, top_k=0, beta=1.0, shuffle_dataset=False,
        seed=args.seed, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_dropout=True,
    )  # fmt: skip
    t0 = time.time()
    student = AutoModelForCausalLM.from_pretrained(models["student"]["path"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"]["path"], dtype=torch.float32)
    trainer = Timed(
        model=student, teacher_model=teacher, args=config, train_dataset=trl_dataset(stream, args.n),
        processing_class=build_char_tokenizer(), callbacks=[StepClock()],
    )  # fmt: skip
    t_train = time.time()
    trainer.train()
    wall = time.time() - t0
    out_dir = work / f"trl_{args.trl_threads}t" / "final"
    trainer.model.save_pretrained(out_dir)
    build_char_tokenizer().save_pretrained(out_dir)
    times = [t_train] + record["step_end"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    steady = gaps[1:]
    tokens = sum(record["tokens"][1:])
    return {
        "startup_s": t_train - t0,
        "first_step_s": gaps[0],
        "steady_steps": len(steady),
        "steady_wall_s": sum(steady),
        "step_s": sum(steady) / max(len(steady), 1),
        "generate_s": sum(record["generate_s"][1:]) / max(len(steady), 1),
        "response_tokens": tokens,
        "tokens_per_s": tokens / sum(steady),
        "train_wall_s": sum(gaps),
        "wall_s": wall,
        "gaps": gaps,
        "final_dir": str(out_dir),
        "lengths": record["lengths"],
        "padding_frac": record["padding"],
    }


def run_trl_child(work: Path, args, threads: int) -> dict[str, Any]:
    """``run_trl`` in a fresh process whose OpenMP threads sleep instead of spinning while they
    wait (as MOPD's actors do): on 2 shared cores spinning threads slowed TRL's steps ~20x."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--trl-child", f"--trl-threads={threads}"]
    with open(work / f"trl_{threads}t.log", "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)
    return json.loads((work / f"trl_{threads}t.json").read_text())


# ---------------------------------------------------------------------- MOPD side


def mopd_figures(run: dict[str, Any]) -> dict[str, Any]:
    steady = _bench.mopd_steady(run)
    recs = run["records"]
    phases = ("rollout", "teachers", "train", "rollout_wait", "sync", "other")
    steady["phase_s"] = {p: sum(r.get(f"timing/{p}", 0.0) for r in recs[1:]) / max(len(recs) - 1, 1) for p in phases}
    steady["train_wall_s"] = sum(steady["gaps"]) - steady["startup_s"]  # steps only, as TRL's
    steady["wall_s"] = run["wall_s"]
    steady["final_dir"] = str(Path(run["output_dir"]) / "checkpoints" / f"step_{len(recs):06d}" / "hf")
    steady["step_tokens"] = [r.get("rollout/tokens") for r in recs]
    steady["mean_len"] = [r.get("rollout/response_len") for r in recs]
    steady["truncated_frac"] = [r.get("rollout/truncated_frac") for r in recs]
    steady["padding_frac"] = [r.get("train/padding_frac") for r in recs]
    return steady


def mopd_step1_lengths(recipe: Path, stream, args) -> list[int]:
    """The response lengths of mopd's step 1: the same student, sampler, prompts and seed as the run's
    step 1 (one replica: ``HFRolloutActor.generate`` with the pool's ``seed_for(step_seed(seed, 1), 0)``),
    regenerated in this process. With several replicas the rows are split, so the samples differ."""
    from mopd.config import load_config
    from mopd.seeds import seed_for, step_seed
    from rollout.hf import HFRolloutActor

    cfg = load_config(recipe)
    seed = seed_for(step_seed(cfg.run.seed, 1), 0)
    batch = HFRolloutActor(cfg).generate(stream[0], cfg.rollout.n, seed=seed)
    return [int(x) for x in batch.response_mask.sum(-1)]


def spread_lines(res: dict[str, Any]) -> list[str]:
    """The ``--spread`` report: step 1's response lengths, every step's mean, the padding share."""
    max_new = res["args"]["max_new"]

    def fmt(s: dict[str, float]) -> str:
        return (
            f"min {s['min']}, p25 {s['p25']}, median {s['median']}, p75 {s['p75']}, max {s['max']}, "
            f"mean {s['mean']:.1f}, at the cap {s['at_cap']:.0%} (n={s['n']})"
        )

    lines = [f"spread SFT, {k}: {res['models'][k].get('spread_sft')}" for k in ("student", "teacher")]
    m1 = res["mopd_step1"]
    lines.append(f"step 1 response lengths, mopd: {fmt(m1['summary'])}; regenerated tokens {m1['tokens']} vs the "
                 f"run's {m1['run_tokens']:.0f}")  # fmt: skip
    for t, r in res["trl_runs"].items():
        lines.append(
            f"step 1 response lengths, TRL {t} thread(s): {fmt(_bench.length_summary(r['lengths'][0], max_new))}"
        )
    m = res["mopd"]
    lines.append("mopd mean response length per step: " + ", ".join(f"{x:.0f}" for x in m["mean_len"] if x is not None))
    lines.append(
        "mopd truncated share per step: " + ", ".join(f"{x:.2f}" for x in m["truncated_frac"] if x is not None)
    )
    for t, r in res["trl_runs"].items():
        means = [sum(x) / len(x) for x in r["lengths"]]
        lines.append(f"TRL {t} thread(s) mean response length per step: " + ", ".join(f"{x:.0f}" for x in means))
    pad = [x for x in m["padding_frac"] if x is not None]
    lines.append(f"padding share of computed positions, mopd train (token budget {res['args']['token_budget']}): "
                 + ", ".join(f"{x:.2f}" for x in pad))  # fmt: skip
    for label, r in res.get("mopd_also", {}).items():
        lines.append(f"padding share of computed positions, mopd train ({label}): "
                     + ", ".join(f"{x:.2f}" for x in r["padding_frac"] if x is not None))  # fmt: skip
    for t, r in res["trl_runs"].items():
        lines.append(f"padding share of computed positions, TRL {t} thread(s): "
                     + ", ".join(f"{x:.2f}" for x in r["padding_frac"]))  # fmt: skip
    return lines


# ---------------------------------------------------------------------- report


def report(res: dict[str, Any]) -> str:
    student = res["models"]["student"]
    lines = [
        f"student {student['params'] / 1e6:.1f}M params ({student['active_params'] / 1e6:.1f}M active), "
        f"teacher {res['models']['teacher']['params'] / 1e6:.1f}M; "
        f"{res['args']['prompts']} prompts x {res['args']['n']} samples x "
        f"<= {res['args']['max_new']} new tokens per step, {res['args']['steps']} steps; "
        f"load {res['machine']['load_avg_1_5_15']} -> {res['machine_after']['load_avg_1_5_15']}",
        "| | start-up s | step 1 s | steady s/step | response tok/s | held-out acc | reverse KL (init -> final) "
        "| KL drop per s of steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kl0 = res["quality"]["init"]["reverse_kl"]
    rows = [(f"mopd, {mopd_label(res['args'])}", res["mopd"], "mopd")]
    if "mopd_overlap" in res:
        rows.append(("mopd, rollout.overlap", res["mopd_overlap"], "mopd_overlap"))
    for label, r in res.get("mopd_also", {}).items():
        rows.append((f"mopd, {label}", r, f"mopd_also:{label}"))
    n_mopd = len(rows)
    for threads, r in res["trl_runs"].items():
        rows.append((f"TRL, {threads} thread(s)", r, f"trl_{threads}"))
    for name, r, key in rows:
        q = res["quality"].get(key)
        qual = "| | |" if q is None else f"| {q['accuracy']:.3f} | {kl0:.3f} -> {q['reverse_kl']:.3f} |"
        drop = "" if q is None else f"{(kl0 - q['reverse_kl']) / r['train_wall_s']:.4f}"
        lines.append(
            f"| {name} | {r['startup_s']:.1f} | {r['first_step_s']:.2f} | {r['step_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} {qual} {drop} |"
        )
    best = res["trl_best_threads"]
    lines.append(f"fastest TRL configuration: {best} thread(s), {res['trl_runs'][best]['step_s']:.2f} s/step")
    lines.append(f"throughput mopd ({mopd_label(res['args'])}) / fastest TRL: {res['ratio']:.2f}x")
    if "mopd_overlap" in res:
        lines.append(f"throughput mopd (rollout.overlap) / fastest TRL: {res['ratio_overlap']:.2f}x")
    for label, r in res.get("mopd_also", {}).items():
        lines.append(f"throughput mopd ({label}) / fastest TRL: {r['tokens_per_s'] / res['trl']['tokens_per_s']:.2f}x")
    for name, r, _ in rows[:n_mopd]:
        lines.append(
            f"{name}, phases (s/step, steps 2..N): " + ", ".join(f"{k} {v:.3f}" for k, v in r["phase_s"].items())
        )
    for threads, r in res["trl_runs"].items():
        lines.append(
            f"TRL, {threads} thread(s) (s/step, steps 2..N): generate {r['generate_s']:.3f}, "
            f"everything else (teacher forward, student forward/backward, optimizer) {r['non_generate_s']:.3f}"
        )
    for threads, ratio in res["arithmetic_ratio"].items():
        lines.append(
            f"mopd ({mopd_label(res['args'])}) teacher scoring + train + sync / TRL {threads} thread(s) "
            "non-generation time: "
            f"{ratio:.2f}"
        )
    if "kl_gap" in res:
        lines.append("reverse KL after the run minus the fastest TRL's: " + ", ".join(
            f"{k} {v:+.3f}" for k, v in res["kl_gap"].items()))  # fmt: skip
    if "mopd_step1" in res:
        lines += spread_lines(res)
    return "\n".join(lines)


def mopd_label(args: dict[str, Any]) -> str:
    """What mopd's main run is: phases in turn or overlapped, and its token budget if any."""
    label = "rollout.overlap" if args.get("overlap") else "phases in turn"
    if args.get("token_budget"):
        label += f", token budget {args['token_budget']}"
    return label


def budget_overrides(args, domains: tuple[str, ...] = ("math",)) -> list[str]:
    """mopd's overrides for ``--token-budget``: the trainer's micro-batches and every HF teacher's
    scoring passes by tokens."""
    if not args.token_budget:
        return []
    b = int(args.token_budget)
    return [f"trainer.max_tokens_per_micro_batch={b}", *(f"teachers.{d}.max_tokens_per_batch={b}" for d in domains)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _bench.add_workload_args(p)
    p.add_argument(
        "--trl-threads", default="2", help="torch threads of the TRL process; a list (2,1) runs TRL once per entry"
    )
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench", help="models, runs and logs go here")
    p.add_argument("--out", default="results/vs_trl.json")
    p.add_argument("--also-overlap", action="store_true", help="run mopd a second time with rollout.overlap=true")
    p.add_argument(
        "--also", action="append", default=[], metavar="OVERRIDES",
        help="run mopd once more with these recipe overrides (space-separated, e.g. "
        "'rollout.backend=vllm rollout.overlap=true'); may be given several times",
    )  # fmt: skip
    p.add_argument(
        "--spread", action="store_true",
        help="student and teacher SFT'd on responses of spread-out lengths first (module docstring)",
    )  # fmt: skip
    p.add_argument(
        "--spread-sft-steps", type=int, default=100, help="--spread: SFT steps of each model (16 rows a step)"
    )
    p.add_argument(
        "--token-budget", type=int, default=None,
        help="mopd's trainer.max_tokens_per_micro_batch and teachers' max_tokens_per_batch (default: 2048 with "
        "--spread, else 0: rows per micro-batch)",
    )  # fmt: skip
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.token_budget is None:
        args.token_budget = 2048 if args.spread else 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = _bench.save_models(work, args.seed)
    if args.spread:
        if not args.trl_child:
            print(f"spread-length student and teacher: SFT {args.spread_sft_steps} steps each ...", flush=True)
        models = _bench.spread_models(work, models, args.max_new, steps=args.spread_sft_steps, seed=args.seed)
    recipe = _bench.recipe(work, models, args, "mopd_vs_trl")
    stream = _bench.prompt_stream(recipe, args.steps)
    if args.trl_child:
        (work / f"trl_{args.trl_threads}t.json").write_text(json.dumps(run_trl(work, models, stream, args)))
        return
    held_out = _bench.eval_rows(recipe, args.eval_prompts)
    res: dict[str, Any] = {"args": vars(args), "models": models, "machine": _bench.machine()}

    print(f"mopd train, {mopd_label(vars(args))} ({args.steps} steps) ...", flush=True)
    res["mopd"] = mopd_figures(_bench.run_mopd(recipe, budget_overrides(args), log=work / "mopd_vs_trl.log"))
    if args.also_overlap and not args.overlap:
        print(f"mopd train, rollout.overlap=true ({args.steps} steps) ...", flush=True)
        over = ["rollout.overlap=true", f"run.output_dir={work / 'mopd_vs_trl_overlap'}"]
        res["mopd_overlap"] = mopd_figures(_bench.run_mopd(recipe, over, log=work / "mopd_vs_trl_overlap.log"))
    res["mopd_also"] = {}
    for i, label in enumerate(args.also):
        print(f"mopd train, {label} ({args.steps} steps) ...", flush=True)
        over = [*label.split(), f"run.output_dir={work / f'mopd_vs_trl_also{i}'}"]
        log = work / f"mopd_vs_trl_also{i}.log"
        res["mopd_also"][label] = mopd_figures(_bench.run_mopd(recipe, over, log=log))
    threads = [int(t) for t in str(args.trl_threads).split(",")]
    res["trl_runs"] = {}
    for t in threads:
        print(f"TRL DistillationTrainer ({args.steps} steps, {t} threads) ...", flush=True)
        r = run_trl_child(work, args, t)
        r["non_generate_s"] = r["step_s"] - r["generate_s"]
        res["trl_runs"][t] = r
    res["machine_after"] = _bench.machine()
    # Every ratio is against TRL's fastest configuration on this machine, not the first listed.
    best = max(res["trl_runs"], key=lambda t: res["trl_runs"][t]["tokens_per_s"])
    res["trl_best_threads"], res["trl"] = best, res["trl_runs"][best]
    res["ratio"] = res["mopd"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
    if "mopd_overlap" in res:
        res["ratio_overlap"] = res["mopd_overlap"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
    # The train side's cost: what mopd spends besides generating, phases in turn (nothing runs beside
    # it), against what each TRL configuration spends besides generating.
    ph = res["mopd"]["phase_s"]
    mopd_side = ph["teachers"] + ph["train"] + ph["sync"]
    res["arithmetic_ratio"] = {t: mopd_side / r["non_generate_s"] for t, r in res["trl_runs"].items()}

    torch.set_num_threads(1)
    if args.spread:
        print("mopd step 1 response lengths ...", flush=True)
        lengths = mopd_step1_lengths(recipe, stream, args)
        res["mopd_step1"] = {
            "lengths": lengths, "summary": _bench.length_summary(lengths, args.max_new), "tokens": sum(lengths),
            "run_tokens": res["mopd"]["step_tokens"][0],
        }  # fmt: skip
    print("held-out quality ...", flush=True)
    teacher = models["teacher"]["path"]
    res["quality"] = {
        "init": _bench.quality(models["student"]["path"], teacher, held_out, args.max_new),
        "mopd": _bench.quality(res["mopd"]["final_dir"], teacher, held_out, args.max_new),
    }
    for t, r in res["trl_runs"].items():
        res["quality"][f"trl_{t}"] = _bench.quality(r["final_dir"], teacher, held_out, args.max_new)
    if "mopd_overlap" in res:
        res["quality"]["mopd_overlap"] = _bench.quality(
            res["mopd_overlap"]["final_dir"], teacher, held_out, args.max_new
        )
    for label, r in res["mopd_also"].items():
        res["quality"][f"mopd_also:{label}"] = _bench.quality(r["final_dir"], teacher, held_out, args.max_new)
    trl_kl = res["quality"][f"trl_{best}"]["reverse_kl"]
    res["kl_gap"] = {k: q["reverse_kl"] - trl_kl for k, q in res["quality"].items() if k.startswith("mopd")}
    print(report(res))
    _bench.write_json(args.out, res)


if __name__ == "__main__":
    main()
