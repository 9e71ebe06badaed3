"""Rollout engines side by side: response tokens per second of the HF backend (``generate`` with
mopd's in-place KV cache, ``rollout/kv_cache.py``), the same backend with transformers' own
``DynamicCache`` (``hf-dynamic``: a torch.cat of the whole cache per step), and the vLLM backend
(``vllm-cpu``) on the same student, prompts, samples per prompt and response length, each recording
the sampled tokens' log-probs as a MOPD rollout must. Also the weight-sync time of each (trainer
state dict -> engine).

The actor classes run in this process with one torch thread each (as in a run's Ray actors; the
vLLM engine runs in the process it spawns). The student is the ``vs_trl.py`` one (Qwen3-MoE,
10.7M parameters, fp32).

    OMP_NUM_THREADS=1 python benchmarks/rollout_engines.py --out results/rollout_engines.json
    OMP_NUM_THREADS=1 python benchmarks/rollout_engines.py --backends hf,hf-dynamic --max-new 512
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import _bench
from mopd.config import load_config


def measure(backend: str, cfg, rows, args) -> dict[str, Any]:
    import rollout.hf
    from rollout.pool import actor_class

    engine = "hf" if backend.startswith("hf") else backend
    cfg.rollout.backend = engine
    own_cache = rollout.hf.preallocated_cache
    if backend == "hf-dynamic":  # no cache handed to generate: it builds its own DynamicCache
        rollout.hf.preallocated_cache = lambda model, capacity: None
    t0 = time.perf_counter()
    actor = actor_class(engine)(cfg)
    start_s = time.perf_counter() - t0
    try:
        actor.generate(rows, cfg.rollout.n, seed=0)  # warm-up
        times, tokens = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            batch = actor.generate(rows, cfg.rollout.n, seed=i + 1)
            times.append(time.perf_counter() - t0)
            tokens.append(int(batch.response_mask.sum()))
        from mopd.models import load_model

        weights = load_model(cfg.student, seed=cfg.run.seed, dtype="float32").state_dict()
        t0 = time.perf_counter()
        actor.load_weights(weights, version=1)
        sync_s = time.perf_counter() - t0
    finally:
        rollout.hf.preallocated_cache = own_cache
        actor.shutdown()
        del actor
        gc.collect()
    per_s = [k / t for k, t in zip(tokens, times, strict=True)]
    return {
        "start_s": start_s,
        "generate_s": times,
        "response_tokens": tokens,
        "tokens_per_s": statistics.median(per_s),
        "sync_s": sync_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench")
    p.add_argument(
        "--student", default=None,
        help="a Hugging Face model directory to roll out instead of the benchmark student (its own tokenizer)",
    )  # fmt: skip
    p.add_argument("--out", default="results/rollout_engines.json")
    args = p.parse_args()
    # The recipe helper wants these; they do not matter here.
    args.steps, args.lr, args.micro_batch, args.rollout_replicas, args.world_size = 1, 1e-4, 16, 1, 1
    args.overlap = False
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = _bench.save_models(work, args.seed)
    recipe = _bench.recipe(work, models, args, "rollout_engines")
    cfg = load_config(recipe)
    cfg.rollout.max_model_len = 1024
    if args.student:
        cfg.student = replace(cfg.student, path=args.student, tokenizer=None)
        res_student: dict[str, Any] = {"path": args.student}
    else:
        res_student = models["student"]
    rows = _bench.prompt_stream(recipe, 1)[0]
    res: dict[str, Any] = {"args": vars(args), "machine": _bench.machine(), "student": res_student}
    for backend in args.backends.split(","):
        print(f"{backend} ...", flush=True)
        res[backend] = measure(backend, cfg, rows, args)
    who = args.student or f"student {models['student']['params'] / 1e6:.1f}M params"
    print(
        f"{who}, {args.prompts} prompts x {args.n} samples x "
        f"<= {args.max_new} new tokens; load {res['machine']['load_avg_1_5_15']}"
    )
    print("| backend | engine start s | generate s (each call) | response tok/s (median) | weight sync s |")
    print("|---|---|---|---|---|")
    for b in args.backends.split(","):
        r = res[b]
        gen = ", ".join(f"{t:.2f}" for t in r["generate_s"])
        print(f"| {b} | {r['start_s']:.1f} | {gen} | {r['tokens_per_s']:.0f} | {r['sync_s']:.3f} |")
    if "hf" in res and "vllm" in res:
        res["ratio_vllm_over_hf"] = res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
        print(f"vLLM / HF: {res['ratio_vllm_over_hf']:.2f}x")
    if "hf" in res and "hf-dynamic" in res:
        res["ratio_hf_over_hf_dynamic"] = res["hf"]["tokens_per_s"] / res["hf-dynamic"]["tokens_per_s"]
        print(f"HF with the in-place cache / with DynamicCache: {res['ratio_hf_over_hf_dynamic']:.2f}x")
    _bench.write_json(args.out, res)


if __name__ == "__main__":
    main()
