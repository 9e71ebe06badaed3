"""Padding and throughput of a train step and of a teacher score on spread-out response lengths:
micro-batches of a fixed row count (``trainer.micro_batch_size``, ``teachers.<d>.batch_size``)
against rows grouped by length under a token budget (``trainer.max_tokens_per_micro_batch``,
``teachers.<d>.max_tokens_per_batch``, mopd/batching.py), and against the same budget with the
rows packed end to end without padding (``pack_sequences``), in one run on one machine.

The workload: ``--rows`` rows, prompts of 16-64 tokens, responses of ``--min-len`` to ``--max-len``
tokens drawn uniformly (seeded), in random order (as a rollout batch comes). The student is the
benchmarks' Qwen3-MoE (benchmarks/_bench.py: 6 layers, 8 experts top-2, hidden 256) with the
objective ``sampled``, one DeepSpeed rank (ZeRO 0); the teacher is the benchmarks' dense Qwen3, HF
backend. The budget defaults to what a fixed micro-batch may hold at its worst (rows x the longest
possible row), so both settings have the same peak activation size; ``--budget`` sets another.

Per setting: the share of computed positions that are padding (``train/padding_frac`` of the step;
for the score, the same count over its passes), the number of passes, and real tokens per second
(prompt + response tokens / time of the call, median of ``--repeats`` after one warm-up call).

    python benchmarks/token_budget.py --out results/token_budget.json     # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from _bench import STUDENT, TEACHER, machine, write_json
from mopd.batching import padded_size, row_spans, token_budget_groups
from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig, TeacherConfig
from mopd.dist.runtime import free_port
from mopd.types import PromptRow, RolloutBatch, TrainBatch
from teachers.common import row_chunks
from teachers.hf import HFTeacherWorker
from trainers.deepspeed_trainer import TrainerWorker


def workload(rows: int, min_len: int, max_len: int, seed: int, vocab: int) -> TrainBatch:
    """Left-padded prompts and right-padded responses of spread-out lengths, random ids."""
    rng = random.Random(seed)
    prompts = [rng.randint(16, 64) for _ in range(rows)]
    responses = [rng.randint(min_len, max_len) for _ in range(rows)]
    P, R = max(prompts), max(responses)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, P + R), generator=g)
    am = torch.zeros(rows, P + R, dtype=torch.bool)
    rm = torch.zeros_like(am)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        am[i, P - p : P + r] = True
        rm[i, P : P + r] = True
    ids = torch.where(am, ids, 0)
    lp = torch.where(rm, torch.full(am.shape, -1.0), 0.0)
    rollout = RolloutBatch(
        input_ids=ids, attention_mask=am, response_mask=rm, rollout_logprobs=lp,
        group_ids=torch.arange(rows), domains=["math"] * rows, rows=[PromptRow("", "math")] * rows,
        responses=[""] * rows, policy_version=0, prompt_len=P,
    )  # fmt: skip
    return TrainBatch(rollout, lp.clone())


def trainer(micro_batch: int, budget: int, packed: bool) -> TrainerWorker:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(config={**STUDENT, "max_position_embeddings": 4096}, tokenizer=BUILTIN_TOKENIZER)
    cfg.trainer.zero_stage, cfg.trainer.micro_batch_size = 0, micro_batch
    cfg.trainer.max_tokens_per_micro_batch, cfg.trainer.pack_sequences = budget, packed
    return TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1"))


def timed(call, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last call's result."""
    out = call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per pass of the fixed setting")
    p.add_argument("--budget", type=int, default=0, help="token budget (default: micro-batch x longest row)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    batch = workload(args.rows, args.min_len, args.max_len, args.seed, STUDENT["vocab_size"])
    am = batch.rollout.attention_mask
    spans = row_spans(am)
    real = int(am.sum())
    budget = args.budget or args.micro_batch * max(e - s for s, e in spans)
    print(f"{args.rows} rows, {real} real tokens, responses {args.min_len}-{args.max_len}; budget {budget}")
    settings = {
        "rows": (args.micro_batch, 0, False), "tokens": (args.micro_batch, budget, False),
        "packed": (args.micro_batch, budget, True),
    }  # fmt: skip
    results: dict[str, Any] = {"machine": machine(), "args": vars(args), "budget": budget, "real_tokens": real}

    for name, (mbs, tokens, packed) in settings.items():
        w = trainer(mbs, tokens, packed)
        seconds, metrics = timed(lambda w=w: w.train_step(batch), args.repeats)
        results[f"train_{name}"] = {
            "seconds": seconds, "tokens_per_s": real / seconds, "padding_frac": metrics["train/padding_frac"],
        }  # fmt: skip
        pad = metrics["train/padding_frac"]
        print(f"train {name:6s}: {seconds:6.2f} s  {real / seconds:7.0f} tok/s  padding {pad:.1%}")
        del w

    for name, (mbs, tokens, packed) in settings.items():
        cfg = TeacherConfig(config=TEACHER, tokenizer=BUILTIN_TOKENIZER, batch_size=mbs)
        cfg.max_tokens_per_batch, cfg.pack_sequences = tokens, packed
        t = HFTeacherWorker("math", cfg, seed=0, set_threads=False)
        r = batch.rollout
        seconds, _ = timed(lambda t=t, r=r: t.score(r.input_ids, r.attention_mask, r.response_mask), args.repeats)
        groups = (
            token_budget_groups(spans, tokens, packed) if tokens
            else [list(range(s.start, s.stop)) for s in row_chunks(len(spans), mbs)]
        )  # fmt: skip
        computed = real if packed else sum(padded_size([spans[i] for i in g]) for g in groups)
        pad = 1 - real / computed
        results[f"score_{name}"] = {
            "seconds": seconds, "tokens_per_s": real / seconds, "padding_frac": pad, "passes": len(groups),
        }  # fmt: skip
        print(f"score {name:6s}: {seconds:6.2f} s  {real / seconds:7.0f} tok/s  padding {pad:.1%} {len(groups)} passes")

    for part in ("train", "score"):
        for name in ("tokens", "packed"):
            speedup = results[f"{part}_{name}"]["tokens_per_s"] / results[f"{part}_rows"]["tokens_per_s"]
            results[f"{part}_{name}_speedup"] = speedup
            print(f"{part}: {name} {speedup:.2f}x the tokens/s of fixed row micro-batches")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
