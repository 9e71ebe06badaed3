"""Weight sync, old path against new: seconds per sync and the driver's peak RSS growth during it.

One trainer rank (DeepSpeed ZeRO-2, fp32 master weights) and one HF rollout replica, as Ray actors,
for a dense Qwen3 student of the chosen size sent in bf16. Each sync is timed from the driver's
call to the replicas' acknowledgement; a thread samples the driver's resident set size
(``/proc/self/statm``) every millisecond meanwhile, and the growth is the peak minus the RSS just
before the call. ``driver``: ``rollout.weight_sync=driver`` (rank 0's state dict through the driver
and Ray's object store); ``direct``: trainer rank 0 broadcasts to the replica over gloo
(mopd/dist/weight_sync.py). The first direct sync also forms the group; it is reported apart. Direct
runs first, so the driver path's allocations cannot hide the direct path's.

    OMP_NUM_THREADS=1 python benchmarks/weight_sync.py --size 10M --out results/weight_sync_10M.json
    OMP_NUM_THREADS=1 python benchmarks/weight_sync.py --size 350M --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from typing import Any

import _bench
from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig
from mopd.models import CHAR_VOCAB_SIZE

# Dense Qwen3 students: (hidden, intermediate, layers, heads, kv heads); head_dim 64.
SIZES = {
    "10M": (384, 1024, 6, 6, 2),
    "100M": (768, 2048, 16, 12, 4),
    "350M": (1024, 2816, 30, 16, 4),
}


def student(size: str) -> dict[str, Any]:
    h, f, layers, heads, kv = SIZES[size]
    return dict(
        model_type="qwen3", vocab_size=CHAR_VOCAB_SIZE, hidden_size=h, intermediate_size=f,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=64,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip


def make_cfg(size: str, bucket_mb: int) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(config=student(size), tokenizer=BUILTIN_TOKENIZER, dtype="bfloat16")
    cfg.rollout.weight_sync_bucket_mb = bucket_mb
    cfg.ray.num_cpus = 2
    return cfg


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Samples this process's RSS in a thread while the ``with`` block runs."""

    def __init__(self, every_s: float = 0.001) -> None:
        self.every_s, self.peak, self.base = every_s, 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def measure(rollout, trainer, mode: str, version: int) -> dict[str, float]:
    rollout.cfg.rollout.weight_sync = mode
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        rollout.sync_from(trainer, version)
        seconds = time.perf_counter() - t0
    assert rollout.versions() == [version]
    return {"seconds": seconds, "rss_growth_bytes": mem.peak - mem.base, "rss_before_bytes": mem.base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="10M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import ray

    from mopd.dist.runtime import init_ray
    from rollout import RolloutPool
    from trainers import TrainerPool

    cfg = make_cfg(args.size, args.bucket_mb)
    init_ray(cfg)
    t0 = time.perf_counter()
    trainer, rollout = TrainerPool(cfg), RolloutPool(cfg)
    startup = time.perf_counter() - t0
    try:
        nbytes = sum(t.numel() * t.element_size() for t in _state_dict_shapes(cfg))
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "driver": []}
        version = 0
        first_direct = None
        for mode in ("direct", "driver"):
            for r in range(args.repeats + (1 if mode == "direct" else 0)):
                version += 1
                m = measure(rollout, trainer, mode, version)
                growth = m["rss_growth_bytes"] / 2**20
                print(f"{args.size} {mode} #{r}: {m['seconds']:.3f} s, driver RSS +{growth:.1f} MiB")
                if mode == "direct" and first_direct is None:
                    first_direct = m  # includes forming the group
                else:
                    runs[mode].append(m)
    finally:
        rollout.shutdown()
        trainer.shutdown()
        ray.shutdown()

    def summary(ms: list[dict[str, float]]) -> dict[str, float]:
        return {
            "seconds_median": statistics.median(m["seconds"] for m in ms),
            "seconds_min": min(m["seconds"] for m in ms),
            "rss_growth_max_bytes": max(m["rss_growth_bytes"] for m in ms),
            "rss_growth_max_fraction_of_model": max(m["rss_growth_bytes"] for m in ms) / nbytes,
        }

    result = {
        "size": args.size,
        "params": nbytes // 2,
        "model_bytes_bf16": nbytes,
        "bucket_mb": args.bucket_mb,
        "startup_s": startup,
        "first_direct": first_direct,
        "direct": summary(runs["direct"]),
        "driver": summary(runs["driver"]),
        "runs": runs,
        "machine": _bench.machine(),
    }
    for mode in ("direct", "driver"):
        s = result[mode]
        print(
            f"{args.size} ({nbytes / 2**20:.0f} MiB bf16) {mode}: median {s['seconds_median']:.3f} s, "
            f"peak driver RSS growth {s['rss_growth_max_bytes'] / 2**20:.1f} MiB "
            f"({100 * s['rss_growth_max_fraction_of_model']:.1f}% of the model)"
        )
    _bench.write_json(args.out, result)


def _state_dict_shapes(cfg: MOPDConfig):
    """The student's state dict on the meta device, in bf16 (sizes only, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = dict(cfg.student.config or {})
    config = AutoConfig.for_model(extra.pop("model_type"), **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return list(model.state_dict().values())


if __name__ == "__main__":
    main()
