"""GPU check of `mopd plan`'s trainer estimate: the peak CUDA memory of a real TrainerWorker step
(one rank, a ~340M-parameter MiMoV2Flash student) against the plan's figure for the same recipe.

    bash scripts/gpu_check.sh                 # on the device machine: part 3 of the GPU check
    python scripts/plan_gpu_check.py CASE     # one case in this process: zero,bf16,checkpointing,batch,tokens
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = ["2,1,0,4,1024", "3,1,0,4,1024", "2,1,1,8,2048", "2,0,0,2,1024"]


def run_case(case: str) -> dict:
    import torch

    from mopd.config import ModelConfig, MOPDConfig
    from mopd.dist.plan import plan_recipe
    from mopd.dist.runtime import free_port
    from mopd.models import tiny_mimo_config
    from mopd.types import PromptRow, RolloutBatch, TrainBatch
    from trainers.deepspeed_trainer import TrainerWorker

    zero, bf16, ckpt, B, T = (int(x) for x in case.split(","))
    pattern = ["full_attention"] + ["sliding_attention"] * 5
    cfg = MOPDConfig()
    cfg.run.total_steps = 10
    cfg.student = ModelConfig(config=tiny_mimo_config(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, v_head_dim=64,
        n_routed_experts=16, num_experts_per_tok=4, sliding_window=128,
        layer_types=pattern * 2, mlp_layer_types=["dense"] + ["sparse"] * 11, max_position_embeddings=4096,
    ), tokenizer="builtin:char")  # fmt: skip
    t = cfg.trainer
    t.zero_stage, t.bf16, t.gradient_checkpointing, t.micro_batch_size = zero, bool(bf16), bool(ckpt), B
    t.resources.num_gpus = 1
    P = T // 4
    cfg.data.max_prompt_len, cfg.rollout.max_new_tokens = P, T - P
    plan = plan_recipe(cfg).actors[0]
    g = torch.Generator().manual_seed(0)
    resp = torch.zeros(B, T, dtype=torch.bool)
    resp[:, P:] = True
    lp = -torch.rand(B, T, generator=g) * resp
    rollout = RolloutBatch(
        input_ids=torch.randint(3, 32000, (B, T), generator=g), attention_mask=torch.ones(B, T, dtype=torch.bool),
        response_mask=resp, rollout_logprobs=lp, group_ids=torch.arange(B), domains=["math"] * B,
        rows=[PromptRow("p", "math")] * B, responses=[""] * B, policy_version=0, prompt_len=P,
    )  # fmt: skip
    batch = TrainBatch(rollout, lp - 0.1 * resp)
    base = torch.cuda.memory_allocated()
    port = free_port("127.0.0.1")
    w = TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=port)
    w.train_step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    w.train_step(batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {
        "case": case,
        "estimate_GB": round(plan.need / 1e9, 3), "parts_GB": {k: round(v / 1e9, 3) for k, v in plan.parts.items()},
        "peak_allocated_GB": round(peak / 1e9, 3), "peak_reserved_GB": round(torch.cuda.max_memory_reserved() / 1e9, 3),
        "ratio": round(plan.need / peak, 3),
    }  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print("RESULT " + json.dumps(run_case(sys.argv[1])), flush=True)
    else:
        for case in CASES:
            proc = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=200)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            print(lines[-1][7:] if lines else f"{case}: failed: {proc.stderr[-1500:]}", flush=True)
