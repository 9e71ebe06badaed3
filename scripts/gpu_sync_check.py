"""GPU check of the direct weight sync: trainer rank 0 (``TrainerWorker``, ZeRO-3, bf16) and an HF
rollout worker (``HFRolloutActor``) in two processes on one device, joined in the product's
weight-sync group (``mopd/dist/weight_sync.py``), as a colocated run places them.

For each backend given (``--backends nccl,gloo``) it starts the trainer process, joins the group
from this process, syncs ``--syncs`` policy versions and prints the seconds per sync (the
receiver's wall clock: join excluded, plan + every bucket + the copy into the parameters included),
then checks that the rollout holds the trainer's weights (within bf16 rounding of a fresh copy of the
trainer's initial weights; the rollout started from other ones, which must differ before the sync).

NCCL refuses a communicator with two ranks on one GPU ("Duplicate GPU detected", NCCL >= 2.5): on
a one-GPU machine the nccl attempt is expected to fail, and the script reports how; the gloo
group (buckets staged through host memory) is what a colocated run uses.

    python scripts/gpu_sync_check.py [--backends nccl,gloo] [--cpu --tiny]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def make_cfg(tiny: bool, cpu: bool, seed: int):
    from gpu_check import student_config
    from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig

    cfg = MOPDConfig()
    cfg.run.total_steps, cfg.run.seed = 10, seed
    cfg.student = ModelConfig(config=student_config(tiny), tokenizer=BUILTIN_TOKENIZER, dtype="bfloat16")
    gpus = 0.0 if cpu else 1.0
    cfg.rollout.resources.num_gpus = gpus
    t = cfg.trainer
    t.zero_stage, t.bf16, t.world_size, t.lr = 3, True, 1, 1e-5
    t.resources.num_gpus = gpus
    return cfg


def trainer_process(args, backend: str, store_port: int, ds_port: int, syncs: int, out) -> None:
    """Group rank 0: the trainer hosts the store, joins, and sends ``syncs`` versions."""
    try:
        from trainers.deepspeed_trainer import TrainerWorker

        cfg = make_cfg(args.tiny, args.cpu, seed=0)
        trainer = TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=ds_port)
        trainer.host_weight_sync("127.0.0.1", store_port)
        trainer.join_weight_sync("127.0.0.1", store_port, 0, 2, backend)
        sent = [trainer.send_weights(v, args.bucket_mb << 20) for v in range(1, syncs + 1)]
        out.put({"ok": True, "bytes": sent[-1]})
    except BaseException as e:  # reported by the parent
        out.put({"ok": False, "error": f"{type(e).__name__}: {e}"[:600], "trace": traceback.format_exc()[-1500:]})


def check_backend(args, backend: str) -> dict:
    import torch

    from mopd.dist.runtime import free_port
    from mopd.models import load_model
    from rollout.hf import HFRolloutActor

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store_port, ds_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    proc = ctx.Process(target=trainer_process, args=(args, backend, store_port, ds_port, args.syncs, out))
    proc.start()
    res: dict = {"backend": backend}
    try:
        actor = HFRolloutActor(make_cfg(args.tiny, args.cpu, seed=1))  # other initial weights
        want = load_model(make_cfg(args.tiny, args.cpu, seed=0).student, seed=0).state_dict()

        def max_rel_diff() -> float:
            got = actor.model.state_dict()
            return max(
                float((got[k].float().cpu() - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-6))
                for k, w in want.items()
            )

        res["max_rel_diff_before"] = max_rel_diff()
        t0 = time.perf_counter()
        actor.join_weight_sync("127.0.0.1", store_port, 0, 1, 2, backend)
        res["join_s"] = time.perf_counter() - t0
        times = []
        for v in range(1, args.syncs + 1):
            t0 = time.perf_counter()
            assert actor.receive_weights(v) == v
            if actor.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        res["sync_s"] = times
        worst = res["max_rel_diff_after"] = max_rel_diff()
        res["ok"] = worst < 2e-2 < res["max_rel_diff_before"] and actor.version() == args.syncs
    except BaseException as e:
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"[:600]
    finally:
        proc.join(args.timeout)
        if proc.is_alive():
            proc.kill()
            res["trainer"] = {"ok": False, "error": f"trainer process still running after {args.timeout} s; killed"}
        elif not out.empty():
            res["trainer"] = out.get()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="nccl,gloo")
    p.add_argument("--syncs", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=128)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the trainer process")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    for backend in args.backends.split(","):
        print(f"--- weight sync over {backend}, two processes, one device", flush=True)
        res = check_backend(args, backend)
        results.append(res)
        if "sync_s" in res:
            s = res["sync_s"]
            mb = (res.get("trainer") or {}).get("bytes", 0) / 2**20
            print(f"  join {res['join_s']:.2f} s; syncs {', '.join(f'{x:.3f}' for x in s)} s; {mb:.0f} MiB a sync")
            before, after = res["max_rel_diff_before"], res["max_rel_diff_after"]
            print(f"  rollout vs the trainer's weights, max relative diff: {before:.2e} before, {after:.2e} after")
        if not res.get("ok"):
            print(f"  FAILED: {res.get('error') or (res.get('trainer') or {}).get('error')}")
        print(
            json.dumps(
                {k: v for k, v in res.items() if k != "trainer"}
                | {"trainer": {k: v for k, v in (res.get("trainer") or {}).items() if k != "trace"}}
            ),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
