"""Measure Rollout Routing Replay (R3): how close the trainer's log-probs come to the rollout's with
and without replaying the rollout's MoE routes, when the two engines' numerics differ.

The rollout is the HF backend in bfloat16 (weights cast from the trainer's), the trainer an fp32
forward of the same master weights, as in a run with ``student.dtype: bfloat16`` and
``trainer.bf16: false``. For each tiny MoE student (MiMoV2Flash, Qwen3-MoE) it samples one batch and
prints, over the response tokens: mean and max |logp_train - logp_rollout|, the fraction of
(token, MoE layer) pairs whose expert set the trainer would choose differently, and the fraction
of tokens the objective's IS band masks, for the default band (0.5, 5.0) and tighter ones.

    OMP_NUM_THREADS=1 python benchmarks/routing_replay.py            # ~1 min on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/routing_replay.py --sharpen 1 --max-new 32
"""

from __future__ import annotations

import argparse
import time

import torch

from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig
from mopd.models import forward_logits, load_model, tiny_mimo_config, token_logprobs
from mopd.routing import record_routes, replay_routes
from mopd.types import PromptRow

BANDS = ((0.5, 5.0), (0.8, 1.25), (0.95, 1.05))


def students(experts: int, top_k: int) -> dict[str, dict]:
    common = dict(hidden_size=128, moe_intermediate_size=64, num_experts_per_tok=top_k)
    qwen = dict(
        model_type="qwen3_moe", vocab_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=experts, norm_topk_prob=True,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    return {
        "MiMoV2Flash": tiny_mimo_config(n_routed_experts=experts, intermediate_size=256, **common),
        "Qwen3-MoE": {**qwen, **common},
    }


def prompts(k: int):
    return [PromptRow(prompt=f"{i * 13} + {i * 37} = ", domain="math", index=i) for i in range(k)]


def measure(name: str, config: dict, args) -> dict[str, float]:
    from rollout.hf import HFRolloutActor

    cfg = MOPDConfig()
    cfg.student = ModelConfig(config=config, tokenizer=BUILTIN_TOKENIZER, dtype="bfloat16")
    cfg.rollout.max_new_tokens = args.max_new
    cfg.rollout.routing_replay = True
    trainer = load_model(cfg.student, seed=args.seed, dtype="float32").eval()
    with torch.no_grad():
        trainer.lm_head.weight.mul_(args.sharpen)  # peaked next-token distributions, like a trained model
    actor = HFRolloutActor(cfg)
    actor.load_weights({k: v.to(torch.bfloat16) for k, v in trainer.state_dict().items()}, version=0)
    t0 = time.perf_counter()
    batch = actor.generate(prompts(args.prompts), n=args.n, seed=args.seed)
    gen_s = time.perf_counter() - t0
    resp, real = batch.response_mask, batch.attention_mask
    out = {"tokens": float(resp.sum()), "generate_s": gen_s}
    with torch.no_grad():
        for mode, routes in (("off", None), ("on", batch.routed_experts)):
            with replay_routes(trainer, routes), record_routes(trainer) as rec:
                logits = forward_logits(trainer, batch.input_ids, batch.attention_mask).logits
            diff = (token_logprobs(logits, batch.input_ids) - batch.rollout_logprobs)[resp]
            out[f"{mode}/mean_abs_diff"] = float(diff.abs().mean())
            out[f"{mode}/max_abs_diff"] = float(diff.abs().max())
            ratio = diff.exp()
            for lo, hi in BANDS:
                out[f"{mode}/masked[{lo},{hi}]"] = float(((ratio < lo) | (ratio > hi)).float().mean())
            chosen = rec.routes(rows=len(batch))
            known = (batch.routed_experts >= 0).all(-1) & real[..., None]
            differs = (chosen.sort(-1).values != batch.routed_experts.sort(-1).values).any(-1)
            out[f"{mode}/route_mismatch"] = float(differs[known].float().mean())
    print(f"{name}: {int(out['tokens'])} response tokens, generate {gen_s:.2f} s")
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    header = ["student", "R3", "mean abs diff", "max abs diff", "route mismatch"]
    header += [f"masked ({lo}, {hi})" for lo, hi in BANDS]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        for mode in ("off", "on"):
            cells = [
                f"{r[f'{mode}/mean_abs_diff']:.2e}",
                f"{r[f'{mode}/max_abs_diff']:.2e}",
                f"{100 * r[f'{mode}/route_mismatch']:.2f}%",
            ]
            cells += [f"{100 * r[f'{mode}/masked[{lo},{hi}]']:.2f}%" for lo, hi in BANDS]
            rows.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--sharpen", type=float, default=10.0, help="lm_head scale (1 = random init)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {name: measure(name, c, args) for name, c in students(args.experts, args.top_k).items()}
    print(table(results))


if __name__ == "__main__":
    main()
