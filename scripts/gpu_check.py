"""GPU check: a few MOPD steps in one process on one CUDA device, with a MiMoV2Flash student of a few
hundred million parameters; prints tokens per second per phase and the model FLOP utilisation.

No Ray and no vLLM (the device machine has neither): the phases are the in-process classes the Ray
actors wrap, used as they are (each puts itself on the device its recipe resources ask for, see
``mopd.dist.devices``), each timed: HF rollout (``rollout.hf.HFRolloutActor``, bf16, routing replay on), HF
teacher scoring (``teachers.hf.HFTeacherWorker``, bf16), the DeepSpeed trainer
(``trainers.deepspeed_trainer.TrainerWorker``: ZeRO-2 or 3 (``--zero``), bf16, world size 1) and the weight sync back
to the rollout model. It also measures routing replay's effect on the first batch: the trainer's
log-probs against the rollout's with and without the recorded routes.

    bash scripts/gpu_check.sh                                     # on the device (see that file)
    OMP_NUM_THREADS=1 python scripts/gpu_check.py --cpu --tiny    # the same code path on CPU, ~30 s

MFU = 6 * N_active * tokens / time / peak (training; 2 * N_active for forward-only phases), where
N_active counts the parameters one token passes through (attention, dense MLP, router, k of the E
experts, LM head; not the embedding table) and ``tokens`` the real (non-padding) tokens. Attention
score FLOPs are left out. Peak: 989 TFLOP/s, the dense bf16 figure of an H100/H200 SXM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense (no sparsity)


# --------------------------------------------------------------------------- configuration


def student_config(tiny: bool) -> dict:
    """~340M total / ~130M active parameters (hybrid attention 5:1, first layer dense, 16 experts
    top-4), or the tests' tiny student."""
    from mopd.models import tiny_mimo_config

    if tiny:
        return tiny_mimo_config()
    pattern = ["full_attention"] + ["sliding_attention"] * 5
    return tiny_mimo_config(
        hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, v_head_dim=64,
        n_routed_experts=16, num_experts_per_tok=4, sliding_window=128,
        layer_types=pattern * 2, mlp_layer_types=["dense"] + ["sparse"] * 11, max_position_embeddings=4096,
    )  # fmt: skip


def make_cfg(args):
    from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig, TeacherConfig

    cfg = MOPDConfig()
    cfg.run.total_steps = args.steps
    model = dict(config=student_config(args.tiny), tokenizer=BUILTIN_TOKENIZER, dtype="bfloat16")
    cfg.student = ModelConfig(**model)
    cfg.teachers = {"math": TeacherConfig(**model, batch_size=args.teacher_batch)}
    # All three workers share the one device here (in one process), as they could share a GPU under Ray.
    gpus = 0.0 if args.cpu else 1.0
    cfg.teachers["math"].resources.num_gpus = gpus
    r = cfg.rollout
    r.n, r.prompts_per_step, r.max_new_tokens, r.routing_replay = args.n, args.prompts, args.max_new, True
    r.resources.num_gpus = gpus
    t = cfg.trainer
    t.zero_stage, t.bf16, t.world_size, t.lr, t.micro_batch_size = args.zero, True, 1, 1e-5, args.micro_batch
    t.resources.num_gpus = gpus
    return cfg


# --------------------------------------------------------------------------- the phases on a device


def rollout_actor(cfg):
    from rollout.hf import HFRolloutActor

    return HFRolloutActor(cfg)


def teacher_worker(cfg):
    from teachers.hf import HFTeacherWorker

    return HFTeacherWorker("math", cfg.teachers["math"], seed=1, set_threads=False)


def trainer_worker(cfg):
    from mopd.dist.runtime import free_port
    from trainers.deepspeed_trainer import TrainerWorker

    port = free_port("127.0.0.1")
    return TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=port)


def prompts(k: int, step: int):
    from mopd.types import PromptRow

    return [PromptRow(prompt=f"{step * 131 + i * 17} + {i * 37} = ", domain="math", index=i) for i in range(k)]


def active_params(model) -> int:
    """Parameters one token passes through (see the module docstring)."""
    from mopd.routing import moe_routers

    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    routers = moe_routers(model)
    share = routers[0].top_k / routers[0].weight.shape[0] if routers else 1.0
    return int(total - embed - experts * (1 - share))


# --------------------------------------------------------------------------- the run


def replay_effect(trainer, batch, bands=((0.5, 5.0), (0.8, 1.25))) -> dict[str, float]:
    """Trainer vs rollout log-probs on ``batch``, without and with its recorded routes."""
    out = {}
    resp = batch.response_mask
    for mode, routes in (("off", None), ("on", batch.routed_experts)):
        lp = trainer.logprobs(batch.input_ids, batch.attention_mask, routed_experts=routes)
        diff = (lp - batch.rollout_logprobs)[resp]
        out[f"r3_{mode}/mean_abs_diff"] = float(diff.abs().mean())
        for lo, hi in bands:
            ratio = diff.exp()
            out[f"r3_{mode}/masked[{lo},{hi}]"] = float(((ratio < lo) | (ratio > hi)).float().mean())
    return out


def timed(sync, fn, *args, **kwargs):
    """fn(*args, **kwargs) and its seconds, after ``sync`` (the device has finished)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t0


def run(args) -> dict:
    from mopd.types import TrainBatch

    sync = (lambda: None) if args.cpu else torch.cuda.synchronize
    allocated = (lambda: 0) if args.cpu else torch.cuda.memory_allocated
    cfg = make_cfg(args)
    t0 = time.perf_counter()
    trainer = trainer_worker(cfg)
    actor = rollout_actor(cfg)
    teacher = teacher_worker(cfg)
    print(f"devices: rollout {actor.device}, teacher {teacher.device}, trainer {trainer.device}", flush=True)
    n_total = sum(p.numel() for p in actor.model.parameters())
    n_active = active_params(actor.model)  # a full copy (ZeRO-3 partitions the trainer's)
    setup_s = time.perf_counter() - t0
    print(
        f"device {torch.cuda.get_device_name() if not args.cpu else 'cpu'}; student {n_total / 1e6:.1f}M params, "
        f"{n_active / 1e6:.1f}M active per token; setup {setup_s:.1f} s",
        flush=True,
    )
    steps: list[dict] = []
    for step in range(args.steps):
        rows = prompts(args.prompts, step)
        batch, t_roll = timed(sync, actor.generate, rows, n=args.n, seed=step)
        if step == 0:
            r3 = replay_effect(trainer, batch)
        scores, t_teach = timed(sync, teacher.score, batch.input_ids, batch.attention_mask, batch.response_mask)
        turns = {}
        if args.colocated:  # as the loop takes turns: the rollout frees the device while the trainer steps
            held = allocated()
            _, turns["sleep_s"] = timed(sync, actor.sleep)
            turns["sleep_freed_gb"] = (held - allocated()) / 1e9
        metrics, t_train = timed(sync, lambda b, lp: trainer.train_step(TrainBatch(b, lp)), batch, scores.logprobs)
        if args.colocated:
            _, turns["wake_s"] = timed(sync, actor.wake)
        _, t_sync = timed(sync, lambda: actor.load_weights(trainer.state_dict(), trainer.get_version()))
        real, resp = int(batch.attention_mask.sum()), int(batch.response_mask.sum())
        s = dict(
            step=step, rollout_s=t_roll, teacher_s=t_teach, train_s=t_train, sync_s=t_sync,
            response_tokens=resp, real_tokens=real, width=int(batch.input_ids.shape[1]),
            rollout_tok_s=resp / t_roll, teacher_tok_s=real / t_teach, train_tok_s=real / t_train,
            train_mfu=6 * n_active * real / t_train / PEAK_BF16_FLOPS,
            teacher_mfu=2 * n_active * real / t_teach / PEAK_BF16_FLOPS,
            loss=metrics["train/loss"], is_masked=metrics["train/is_masked_frac"],
            abs_diff=metrics["train/train_rollout_abs_diff"], **turns,
        )  # fmt: skip
        steps.append(s)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in s.items()}), flush=True)
    timed_steps = steps[1:] or steps  # step 0 carries the warm-up (allocations, kernel selection)
    mean = {k: sum(s[k] for s in timed_steps) / len(timed_steps) for k in steps[0] if k != "step"}
    return dict(
        setup_s=setup_s,
        params=n_total,
        active_params=n_active,
        steps=steps,
        mean=mean,
        r3=r3,
        device=("cpu" if args.cpu else torch.cuda.get_device_name()),
    )


def summary(res: dict, cpu: bool) -> str:
    m = res["mean"]
    mfu = (lambda x: "n/a (CPU)") if cpu else (lambda x: f"{100 * x:.2f}%")
    lines = [
        f"mean over steps 1..{len(res['steps']) - 1} (step 0 is warm-up):"
        if len(res["steps"]) > 1
        else "step 0 (warm-up included):",
        f"  rollout  {m['rollout_tok_s']:10.0f} response tok/s  ({m['rollout_s']:.2f} s)",
        f"  teacher  {m['teacher_tok_s']:10.0f} tok/s           ({m['teacher_s']:.2f} s)  MFU {mfu(m['teacher_mfu'])}",
        f"  train    {m['train_tok_s']:10.0f} tok/s           ({m['train_s']:.2f} s)  MFU {mfu(m['train_mfu'])}",
        f"  sync     {m['sync_s']:.2f} s",
        *(
            [
                f"  colocated turns: sleep {m['sleep_s']:.3f} s (frees {m['sleep_freed_gb']:.2f} GB), "
                f"wake {m['wake_s']:.3f} s"
            ]
            if "sleep_s" in m
            else []
        ),
        "routing replay on step 0's batch (trainer vs rollout log-probs): "
        + ", ".join(f"{k} {v:.4g}" for k, v in res["r3"].items()),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: a quick test of this script)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny student and a small batch")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--teacher-batch", type=int, default=64)
    p.add_argument("--zero", type=int, default=2, choices=(2, 3), help="the trainer's ZeRO stage")
    p.add_argument("--colocated", action="store_true", help="the rollout sleeps while the trainer steps")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    small = args.tiny or args.cpu
    args.steps = args.steps or (3 if small else 5)
    args.prompts = args.prompts or (4 if small else 32)
    args.max_new = args.max_new or (16 if small else 256)
    args.micro_batch = args.micro_batch or (8 if small else 32)
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu --tiny to check the script on a CPU")
    res = run(args)
    print(summary(res, args.cpu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
