"""Where the train phase's time goes, in one process, against the same arithmetic done by hand and
by TRL's own loss code.

On one batch of the ``vs_trl.py`` workload (8 prompts x 4 samples x <= 128 new tokens, the 10.7M
Qwen3-MoE student, the 3.2M dense teacher, fp32, one torch thread unless ``--threads``), in rounds
so that load on the machine hits every variant alike (the figure of each is its median over rounds):

- ``mopd score``: ``HFTeacherWorker.score`` with the top-k = vocabulary the benchmark recipe uses;
- ``mopd train_step``: ``TrainerWorker.train_step`` as ``mopd train`` runs it, on one rank, with
  DeepSpeed ZeRO-2 (the recipes' default) and with ``trainer.zero_stage=0`` (what the benchmarks'
  one-rank recipe uses: same update, no ZeRO bucket copies);
- ``bare``: the same student, objective and micro-batches in plain torch (no DeepSpeed): forward,
  ``topk_reverse_kl_loss``, backward, clip, ``torch.optim.AdamW``;
- ``TRL arithmetic`` (when ``trl`` is installed, the ``bench`` extra): what TRL's
  ``DistillationTrainer`` does per step besides generating: student backbone, teacher backbone
  (no grad), TRL's ``_chunked_divergence_loss`` with ``beta=1``, backward, clip, AdamW.

Then it splits ``train_step`` (both stages) by wall clock into the model forward, the loss
(log-softmax, top-k gather, objective, metric sums), DeepSpeed's backward, the optimizer step, the
metric reduction and the rest, times Ray's serialiser on one rank's batch, and lists torch profiler
self time by kind of operator. It prints ``(mopd score + mopd train_step) / TRL arithmetic``: the
cost of MOPD's train side against TRL's for the same update.

    OMP_NUM_THREADS=1 python benchmarks/train_profile.py --out results/train_profile.json   # ~2 min
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _bench
from mopd.config import load_config
from mopd.dist.runtime import free_port

# Operator kinds of the profiler table (by aten name); everything else is "other".
KINDS = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::linear", "aten::matmul"),
    "attention": ("scaled_dot_product", "flash_attention"),
    "softmax / log-softmax": ("softmax",),
    "copies and layout": ("aten::copy_", "aten::cat", "aten::index", "aten::_index_put", "aten::clone",
                          "aten::contiguous", "aten::gather", "aten::scatter", "aten::fill_", "aten::zero_",
                          "aten::empty", "aten::to", "aten::_to_copy"),
}  # fmt: skip


def kind_of(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(k in name for k in keys):
            return kind
    return "elementwise and other"


def make_batch(cfg, rows, seed: int):
    from mopd.types import TrainBatch
    from rollout.hf import HFRolloutActor
    from teachers.hf import HFTeacherWorker

    batch = HFRolloutActor(cfg).generate(rows, cfg.rollout.n, seed=1)
    teacher = HFTeacherWorker("math", cfg.teachers["math"], seed=seed)
    scores = teacher.score(batch.input_ids, batch.attention_mask, batch.response_mask, topk=cfg.objective.topk)
    return teacher, TrainBatch(batch, scores.logprobs, None, scores.topk_ids, scores.topk_logprobs)


def bare_step(cfg, micro: int) -> Callable[[Any], None]:
    """The recipe's update in plain torch: HF model, the same objective and micro-batches, AdamW."""
    from mopd.models import forward_logits, load_model, token_logprobs
    from mopd.objective import topk_reverse_kl_loss
    from trainers.deepspeed_trainer import logprobs_at

    model = load_model(cfg.student, seed=cfg.run.seed, dtype="float32")
    t = cfg.trainer
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    o = cfg.objective

    def step(tb) -> None:
        r = tb.rollout
        model.train()
        rows = r.input_ids.shape[0]
        for i in range(0, rows, micro):
            s = slice(i, i + micro)
            logits = forward_logits(model, r.input_ids[s], r.attention_mask[s]).logits
            lp = token_logprobs(logits, r.input_ids[s])
            student_topk = logprobs_at(logits, tb.teacher_topk_ids[s])
            loss, _ = topk_reverse_kl_loss(
                student_topk, tb.teacher_topk_logprobs[s], lp, r.rollout_logprobs[s], r.response_mask[s],
                eps_low=o.eps_low, eps_high=o.eps_high, forward_kl=o.forward_kl,
            )  # fmt: skip
            (loss * (len(range(*s.indices(rows))) / rows)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()

    return step


def trl_step(cfg, micro: int) -> Callable[[Any], None] | None:
    """TRL's per-step arithmetic besides generation, with TRL's own loss function."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(cfg.student.path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teachers["math"].path, dtype=torch.float32).eval()
    t = cfg.trainer
    opt = torch.optim.AdamW(student.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=0.0)

    def hidden(model, ids, am, keep: int) -> torch.Tensor:
        # TRL's _get_last_hidden_state: backbone only, the positions that predict completion tokens.
        return model.base_model(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state[:, :-1][:, -keep:]

    def step(tb) -> None:
        r = tb.rollout
        student.train()
        # TRL lays a batch out as [left-padded prompt | right-padded completion]; so does the rollout.
        prompt_cols = int((r.response_mask.long().cumsum(1) == 0).all(0).sum())
        keep = r.input_ids.shape[1] - prompt_cols
        n_items = r.response_mask[:, prompt_cols:].sum()
        for i in range(0, r.input_ids.shape[0], micro):
            s = slice(i, i + micro)
            ids, am = r.input_ids[s], r.attention_mask[s].long()
            hs = hidden(student, ids, am, keep)
            with torch.no_grad():
                ht = hidden(teacher, ids, am, keep)
            loss, _, _ = _chunked_divergence_loss(
                hs, ht, student.lm_head.weight, teacher.lm_head.weight, r.response_mask[s][:, prompt_cols:].long(),
                1.0, num_items_in_batch=n_items,
            )  # fmt: skip
            loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad()

    return step


def split_train_step(trainer, tb, repeats: int) -> dict[str, float]:
    """Wall-clock parts of ``train_step``: the worker's own methods and DeepSpeed's backward,
    wrapped with timers (median over ``repeats`` calls)."""
    parts: dict[str, list[float]] = defaultdict(list)
    acc: dict[str, float] = defaultdict(float)

    def wrap(obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[label] += time.perf_counter() - t0

        setattr(obj, name, timed)
        return fn

    originals = [
        (trainer, "_micro_batch_loss", wrap(trainer, "_micro_batch_loss", "forward + loss")),
        (trainer, "_forward", wrap(trainer, "_forward", "model forward")),
        (trainer.engine, "backward", wrap(trainer.engine, "backward", "backward (DeepSpeed engine)")),
        (trainer, "_optimizer_step", wrap(trainer, "_optimizer_step", "optimizer step (DeepSpeed engine)")),
        (trainer, "_reduce_metrics", wrap(trainer, "_reduce_metrics", "metric reduction")),
    ]
    try:
        for _ in range(repeats):
            acc.clear()
            t0 = time.perf_counter()
            trainer.train_step(tb)
            total = time.perf_counter() - t0
            # _forward runs inside _micro_batch_loss: split that into the model and the rest.
            acc["loss (log-softmax, top-k gather, objective, metric sums)"] = (
                acc["forward + loss"] - acc["model forward"]
            )
            del acc["forward + loss"]
            for k, v in acc.items():
                parts[k].append(v)
            parts["rest (batch slicing, plan)"].append(total - sum(acc.values()))
            parts["total"].append(total)
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
    return {k: statistics.median(v) for k, v in parts.items()}


def serialise_cost(tb, micro: int) -> dict[str, float]:
    """What handing the batch to a trainer actor costs besides the network: Ray's serialiser
    (pickle protocol 5 with out-of-band tensor buffers, as ``ray.put`` does) on one rank's shard.
    Reading it back maps the same buffers; not timed here."""
    import pickle

    from trainers.shards import shard_batch

    shard = shard_batch(tb, 1, micro)[0]
    ts, size = [], 0
    for _ in range(5):
        buffers: list = []
        t0 = time.perf_counter()
        data = pickle.dumps(shard, protocol=5, buffer_callback=buffers.append)
        ts.append(time.perf_counter() - t0)
        size = len(data) + sum(b.raw().nbytes for b in buffers)
    return {"dumps_s": statistics.median(ts), "bytes": float(size)}


def profile_kinds(fn: Callable[[], Any]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    kinds: dict[str, float] = defaultdict(float)
    top = []
    for e in prof.key_averages():
        if not e.key.startswith("aten::") and "flash_attention" not in e.key:
            continue  # autograd / optimizer wrappers: their self time is tiny, their total double-counts
        kinds[kind_of(e.key)] += e.self_cpu_time_total / 1e6
        top.append((e.key, e.self_cpu_time_total / 1e6, e.count))
    top.sort(key=lambda x: -x[1])
    return {"kinds_s": dict(kinds), "top_ops": top[:12]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _bench.add_workload_args(p)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each variant once per round)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the actors of vs_trl.py use 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--out", default="results/train_profile.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = _bench.save_models(work, args.seed)
    recipe = _bench.recipe(work, models, args, "train_profile")
    cfg = load_config(recipe)
    rows = _bench.prompt_stream(recipe, 1)[0]
    from trainers.deepspeed_trainer import TrainerWorker

    teacher, tb = make_batch(cfg, rows, args.seed)
    r = tb.rollout
    res: dict[str, Any] = {
        "args": vars(args),
        "machine": _bench.machine(),
        "batch": {"rows": r.input_ids.shape[0], "columns": r.input_ids.shape[1],
                  "real_tokens": int(r.attention_mask.sum()), "response_tokens": int(r.response_mask.sum())},
    }  # fmt: skip
    trainers = {
        z: TrainerWorker(load_config(recipe, [f"trainer.zero_stage={z}"]), 0, 1, "127.0.0.1", free_port("127.0.0.1"))
        for z in (2, 0)
    }
    variants: dict[str, Callable[[], Any]] = {
        "mopd score": lambda: teacher.score(r.input_ids, r.attention_mask, r.response_mask, topk=cfg.objective.topk),
        "mopd train_step (ZeRO-2)": lambda: trainers[2].train_step(tb),
        "mopd train_step (ZeRO-0)": lambda: trainers[0].train_step(tb),
    }
    bare = bare_step(cfg, args.micro_batch)
    variants["bare torch (same objective)"] = lambda: bare(tb)
    trl = trl_step(cfg, args.micro_batch)
    if trl is not None:
        variants["TRL arithmetic"] = lambda: trl(tb)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = defaultdict(list)
    for i in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["seconds"] = {"median": med, "rounds": dict(times)}
    res["train_step_parts"] = {z: split_train_step(trainers[z], tb, args.rounds) for z in trainers}
    res["serialise_s"] = serialise_cost(tb, args.micro_batch)
    res["profile"] = {z: profile_kinds(lambda z=z: trainers[z].train_step(tb)) for z in trainers}
    # The stage the benchmark recipe uses (0 on one rank: _bench.zero_stage), and ZeRO-2 for comparison.
    stage = _bench.zero_stage(args)
    res["recipe_zero_stage"] = stage
    for z in trainers:
        train = med[f"mopd train_step (ZeRO-{z})"]
        if trl is not None:
            res[f"ratio_mopd_over_trl_zero{z}"] = (med["mopd score"] + train) / med["TRL arithmetic"]
        res[f"ratio_train_step_over_bare_zero{z}"] = train / med["bare torch (same objective)"]
    res["machine_after"] = _bench.machine()
    print(report(res))
    _bench.write_json(args.out, res)


def report(res: dict[str, Any]) -> str:
    b, med = res["batch"], res["seconds"]["median"]
    lines = [
        f"one batch: {b['rows']} rows x {b['columns']} columns ({b['real_tokens']} real tokens, "
        f"{b['response_tokens']} response tokens), {res['args']['threads']} thread(s); "
        f"load {res['machine']['load_avg_1_5_15']} -> {res['machine_after']['load_avg_1_5_15']}",
        "| variant | median s | rounds |",
        "|---|---|---|",
    ]
    for k, v in med.items():
        rounds = ", ".join(f"{x:.3f}" for x in res["seconds"]["rounds"][k])
        lines.append(f"| {k} | {v:.3f} | {rounds} |")
    for z in (2, 0):
        if f"ratio_mopd_over_trl_zero{z}" in res:
            lines.append(
                f"(mopd score + train_step ZeRO-{z}) / TRL arithmetic: {res[f'ratio_mopd_over_trl_zero{z}']:.2f}"
            )
        lines.append(f"mopd train_step ZeRO-{z} / bare torch: {res[f'ratio_train_step_over_bare_zero{z}']:.2f}")
    parts2, parts0 = res["train_step_parts"][2], res["train_step_parts"][0]
    lines += ["", "| part of train_step | ZeRO-2 s | share | ZeRO-0 s | share |", "|---|---|---|---|---|"]
    for k in parts2:
        if k != "total":
            lines.append(
                f"| {k} | {parts2[k]:.3f} | {100 * parts2[k] / parts2['total']:.1f}% "
                f"| {parts0[k]:.3f} | {100 * parts0[k] / parts0['total']:.1f}% |"
            )
    ser = res["serialise_s"]
    lines.append(f"the batch for one rank ({ser['bytes'] / 1e6:.1f} MB): serialise {1e3 * ser['dumps_s']:.1f} ms")
    k2, k0 = res["profile"][2]["kinds_s"], res["profile"][0]["kinds_s"]
    t2, t0 = sum(k2.values()), sum(k0.values())
    lines += ["", "| operator kind (profiler self time, one train_step) | ZeRO-2 s | share | ZeRO-0 s | share |"]
    lines.append("|---|---|---|---|---|")
    for k in sorted(k2, key=lambda k: -k2[k]):
        v0 = k0.get(k, 0.0)
        lines.append(f"| {k} | {k2[k]:.3f} | {100 * k2[k] / t2:.1f}% | {v0:.3f} | {100 * v0 / t0:.1f}% |")
    for z in (2, 0):
        top = res["profile"][z]["top_ops"][:8]
        lines.append(f"top operators, ZeRO-{z}: " + ", ".join(f"{n} {s:.3f} s x{c}" for n, s, c in top))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
