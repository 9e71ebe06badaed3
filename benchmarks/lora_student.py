"""A LoRA student (``student.lora``) against full fine-tuning on SmolLM2-135M-Instruct: trainable
parameters, the optimizer's state, a checkpoint's size on disk and one train step's time, for one
DeepSpeed rank (ZeRO-2, fp32) on the CPU.

Each case builds a ``TrainerWorker`` in a fresh process, takes one warm-up step and ``--steps``
timed ones on the same batch (8 rows of 32 prompt + 64 response tokens, sampled objective), then
counts the optimizer state's elements (Adam's moments and DeepSpeed's fp32 master partition) and
saves a checkpoint.

    python benchmarks/lora_student.py --out results/lora_student.json     # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(spec: dict) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from mopd.config import LoraSettings, MOPDConfig, StudentConfig
    from mopd.dist.runtime import free_port
    from mopd.types import PromptRow, RolloutBatch, TrainBatch
    from trainers.deepspeed_trainer import TrainerWorker

    cfg = MOPDConfig()
    cfg.run.total_steps = 100
    cfg.student = StudentConfig(path=spec["model"], lora=LoraSettings(r=spec["r"], alpha=2 * spec["r"]))
    cfg.trainer.zero_stage, cfg.trainer.micro_batch_size, cfg.objective.kind = 2, 8, "sampled"
    w = TrainerWorker(cfg, 0, 1, "127.0.0.1", free_port("127.0.0.1"))
    g = torch.Generator().manual_seed(0)
    rows, p, r = 8, 32, 64
    ids = torch.randint(3, 30000, (rows, p + r), generator=g)
    attn = torch.ones_like(ids, dtype=torch.bool)
    resp = torch.zeros_like(attn)
    resp[:, p:] = True
    lp = w.logprobs(ids, attn) * resp
    rollout = RolloutBatch(
        input_ids=ids, attention_mask=attn, response_mask=resp, rollout_logprobs=lp,
        group_ids=torch.arange(rows), domains=["math"] * rows, rows=[PromptRow("p", "math")] * rows,
        responses=[""] * rows, policy_version=0, prompt_len=p,
    )  # fmt: skip
    batch = TrainBatch(rollout, lp - 0.1 * resp, torch.zeros(rows))
    w.train_step(batch)
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        w.train_step(batch)
        times.append(time.perf_counter() - start)
    opt = getattr(w.engine.optimizer, "optimizer", w.engine.optimizer)
    state = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    with tempfile.TemporaryDirectory() as d:
        w.save_checkpoint(d, {"step": 1})
        ckpt = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    trainable = sum(q.numel() for q in w.engine.module.parameters() if q.requires_grad)
    total = sum(q.numel() for q in w.engine.module.parameters())
    out = {"trainable": trainable, "total": total, "optimizer_elements": state, "checkpoint_bytes": ckpt}
    print(json.dumps({**out, "step_s_mean": sum(times) / len(times), "step_s_min": min(times)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))
    model = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "real_model.py")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    results = {}
    for name, r in (("full", 0), (f"lora r={args.rank}", args.rank)):
        env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
        spec = json.dumps({"model": model, "r": r, "steps": args.steps})
        proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
