"""GPU check, part 4 (issue 26): long responses on one device. For the GPU check's student (the
MiMoV2Flash of scripts/gpu_check.py, here with a real vocabulary, 151,936 by default) and one
trainer rank (``trainers.deepspeed_trainer.TrainerWorker``, ZeRO 0, bf16, objective ``topk`` with
k 64), it measures:

(a) the longest response one ``train_step`` completes on the device, one row of T tokens (a
    one-token prompt and T - 1 response tokens), T = 1K, 2K, 4K, ... 64K, stopping at the first
    CUDA out-of-memory error (caught; the memory is freed and the figure after freeing reported),
    for four configurations, each in a fresh process:

      today  ``trainer.logprob_chunk_size: 0`` (the full (T, V) logits), micro-batches by rows
      new    ``trainer.logprob_chunk_size: 1024`` (mopd/logprobs.py) and a token budget
             (``trainer.max_tokens_per_micro_batch``; with one row it changes nothing)

    each without and with ``trainer.gradient_checkpointing``; the peak CUDA memory (allocated and
    reserved) of every size that trained;
(b) train tokens/s and MFU at 4K and 16K tokens: when a configuration's search reaches those
    sizes, the median of ``--repeats`` more steps (the search's own step at that size is the
    warm-up). Every configuration that reaches them is timed; the new path's rows are the figures.

    MFU = (6 * N_active * T + 3 * A(T)) / t / 989e12

with N_active and the peak as in scripts/gpu_check.py (the parameters a token passes through, the
LM head included, the embedding not; the dense bf16 peak of an H100/H200 SXM) and A(T) the forward
FLOPs of the attention scores and their weighted sum of one causal row (2 x heads x (head dim + V
head dim) x the keys each query sees, a sliding-window layer seeing at most its window). The column
``MFU 6N`` leaves A out, as gpu_check.py does. Model FLOPs: the recomputation of gradient
checkpointing is not counted. Note that this student's attention is eager (MiMoV2Flash has
attention sinks and no SDPA path), so every layer holds heads x T x T scores: at long T the
attention, not the log-probs, may be what runs out first; the per-size peaks show which.

The whole part stops at ``--budget-s`` (default 150 s; the GPU check's device call has ~9 minutes
and parts 0-3 take 4-6): a configuration does not start with less than ``--min-config-s`` left,
and the search skips a size whose step would not end in time (its previous step's time x 4, x
(1 + repeats) at the timed sizes); a process still running at the deadline is killed after a short
grace. What was measured is kept: the JSON (``--json``) is rewritten after every configuration.

    bash scripts/gpu_check.sh                       # on the device: part 4 of the GPU check
    python scripts/gpu_long_check.py --json runs/gpu_check/gpu_long_check.json
    python scripts/gpu_long_check.py --cpu --tiny   # the same code on a CPU: tiny student, T = 64..512

With ``--cpu --tiny`` it is a test of the plumbing: the tests' tiny student at vocabulary 1024,
chunk 64, T = 64..512, timed at 128 and 256, no memory figures and no MFU; ``--simulate-oom-at T``
raises a CUDA out-of-memory error at T (marked as simulated) to run the catch-and-free path.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GB = 1e9
QWEN3_VOCAB = 151_936
_RUNNING: list[subprocess.Popen] = []  # the configuration's process, killed if this one is terminated


# --------------------------------------------------------------------------- FLOPs


def attention_flops(config: dict[str, Any], t: int) -> float:
    """Forward FLOPs of QK^T and of the weighted sum of V for one causal row of ``t`` tokens."""
    heads, d_qk = config["num_attention_heads"], config["head_dim"]
    d_v = config.get("v_head_dim") or d_qk
    total = 0.0
    for kind in config["layer_types"]:
        w = min(t, config["sliding_window"]) if kind == "sliding_attention" else t
        keys = w * (w + 1) / 2 + (t - w) * w  # sum over queries i = 1..t of min(i, w)
        total += 2 * heads * (d_qk + d_v) * keys
    return total


def train_flops(n_active: int, config: dict[str, Any], t: int) -> tuple[float, float]:
    """(6 N T, 6 N T + 3 A(T)): the model FLOPs of one train step on one row of ``t`` tokens."""
    dense = 6.0 * n_active * t
    return dense, dense + 3.0 * attention_flops(config, t)


# --------------------------------------------------------------------------- one configuration (child)


def student(spec: dict[str, Any]) -> dict[str, Any]:
    from gpu_check import student_config  # scripts/ is on sys.path when this file runs

    cfg = student_config(spec["tiny"])
    cfg.update(vocab_size=spec["vocab"], max_position_embeddings=max(spec["sizes"]) + 1)
    return cfg


def make_worker(spec: dict[str, Any]):
    from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig
    from mopd.dist.runtime import free_port
    from trainers.deepspeed_trainer import TrainerWorker

    cfg = MOPDConfig()
    cfg.run.total_steps = 1000
    cfg.student = ModelConfig(config=student(spec), tokenizer=BUILTIN_TOKENIZER, dtype="bfloat16")
    t = cfg.trainer
    t.zero_stage, t.bf16, t.world_size, t.lr, t.micro_batch_size = spec["zero"], True, 1, 1e-5, 1
    t.logprob_chunk_size = spec["chunk"]
    t.max_tokens_per_micro_batch = spec["token_budget"]
    t.gradient_checkpointing = spec["ckpt"]
    t.resources.num_gpus = 0.0 if spec["cpu"] else 1.0
    o = cfg.objective
    # The IS band opened, as in benchmarks/logprob_memory.py: every response token has a gradient.
    o.kind, o.topk, o.eps_low, o.eps_high = "topk", spec["k"], 0.0, float("inf")
    return TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1"))


def long_batch(t: int, vocab: int, k: int):
    """One row of ``t`` tokens: a one-token prompt, ``t - 1`` response tokens (random ids), the
    teacher's top-k ids and log-probs, rollout and teacher log-probs of -12 (about ln(1 / V))."""
    import torch

    from mopd.types import PromptRow, RolloutBatch, TrainBatch

    g = torch.Generator().manual_seed(t)
    resp = torch.ones(1, t, dtype=torch.bool)
    resp[:, 0] = False
    lp = torch.where(resp, -12.0, 0.0)
    rollout = RolloutBatch(
        input_ids=torch.randint(3, vocab, (1, t), generator=g), attention_mask=torch.ones_like(resp),
        response_mask=resp, rollout_logprobs=lp, group_ids=torch.zeros(1, dtype=torch.long), domains=["math"],
        rows=[PromptRow("", "math")], responses=[""], policy_version=0, prompt_len=1,
    )  # fmt: skip
    topk_ids = torch.randint(0, vocab, (1, t, k), generator=g) * resp[..., None]
    topk_lp = torch.log_softmax(torch.randn(1, t, k, generator=g), -1) * resp[..., None]
    return TrainBatch(rollout, lp.clone(), None, topk_ids, topk_lp)


def _oom_text(e: BaseException) -> str | None:
    """The first line of an out-of-memory error (None: not one). cuBLAS and some kernels report a
    failed allocation as a plain RuntimeError."""
    import torch

    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return text
    if isinstance(e, RuntimeError) and any(s in str(e) for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")):
        return text
    return None


def emit(kind: str, obj: dict[str, Any]) -> None:
    print(f"{kind} " + json.dumps(obj), flush=True)


def child(spec: dict[str, Any]) -> None:
    """One configuration: set-up, a warm-up step, then the sizes in order (see the docstring).
    Prints ``META``/``ROW``/``RATE``/``STOP`` lines of JSON that the parent collects."""
    import torch

    from gpu_check import PEAK_BF16_FLOPS, active_params

    cuda = not spec["cpu"]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def free() -> None:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def allocated_gb() -> float | None:
        return round(torch.cuda.memory_allocated() / GB, 3) if cuda else None

    def step(batch) -> float:
        t0 = time.perf_counter()
        worker.train_step(batch)
        sync()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    worker = make_worker(spec)
    model = worker.engine.module
    n_total, n_active = sum(p.numel() for p in model.parameters()), active_params(model)
    config = student(spec)
    step(long_batch(min(64, spec["sizes"][0]), spec["vocab"], spec["k"]))  # creates the optimizer state
    free()
    emit("META", {
        "setup_s": round(time.perf_counter() - t0, 2), "params": n_total, "active_params": n_active,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / GB, 2) if cuda else None,
        "allocated_after_warmup_gb": allocated_gb(), "torch": torch.__version__,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    })  # fmt: skip
    last_s = None
    for t in spec["sizes"]:
        rate = t in spec["rate_sizes"]
        if last_s is not None:
            need = last_s * 4 * (1 + spec["repeats"] if rate else 1)
            if time.time() + need > spec["deadline"]:
                emit("STOP", {"tokens": t, "why": f"time budget (~{need:.0f} s needed, "
                              f"{max(0.0, spec['deadline'] - time.time()):.0f} s left)"})  # fmt: skip
                return
        batch = long_batch(t, spec["vocab"], spec["k"])
        free()
        base = allocated_gb()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        oom, err, step_s = None, None, 0.0
        try:
            if spec["simulate_oom_at"] and t >= spec["simulate_oom_at"]:
                raise torch.cuda.OutOfMemoryError(f"simulated out-of-memory at {t} tokens (--simulate-oom-at)")
            step_s = step(batch)
        except Exception as e:  # anything else ends this configuration too, reported
            oom = _oom_text(e)
            if oom is None:
                err = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        if oom is not None or err is not None:
            # Out of the except clause: the traceback's frames (the step's activations) are gone.
            try:
                worker.engine.zero_grad()
            except Exception:  # best effort: this configuration ends here
                pass
            free()
            emit("ROW", {"tokens": t, "ok": False, "oom": oom, "error": err,
                         "allocated_before_gb": base, "allocated_after_free_gb": allocated_gb()})  # fmt: skip
            why = "error" if oom is None else "out of memory" + (" (simulated)" if "simulated" in oom else "")
            emit("STOP", {"tokens": t, "why": why})
            return
        row: dict[str, Any] = {"tokens": t, "ok": True, "step_s": round(step_s, 4), "allocated_before_gb": base}
        if cuda:
            row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
            row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
        emit("ROW", row)
        last_s = step_s
        if rate:
            times = [step(batch) for _ in range(spec["repeats"])]
            med = statistics.median(times)
            dense, full = train_flops(n_active, config, t)
            emit("RATE", {
                "tokens": t, "step_s_median": round(med, 4), "step_s_all": [round(x, 4) for x in times],
                "tok_s": round(t / med, 1),
                "mfu_6n": None if not cuda else round(dense / med / PEAK_BF16_FLOPS, 5),
                "mfu": None if not cuda else round(full / med / PEAK_BF16_FLOPS, 5),
                "flops_6n": dense, "flops": full,
            })  # fmt: skip
            last_s = med
    emit("STOP", {"tokens": None, "why": "all sizes trained"})


# --------------------------------------------------------------------------- the runs (parent)


def run_config(spec: dict[str, Any], log_path: str | None, kill_at: float) -> dict[str, Any]:
    """One configuration in a fresh process; its lines as they come, killed at ``kill_at``."""
    res: dict[str, Any] = {k: spec[k] for k in ("name", "chunk", "ckpt", "token_budget")}
    res.update(rows=[], rates=[], stop=None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    _RUNNING[:] = [proc]
    killed = threading.Event()

    def kill() -> None:
        if proc.poll() is None:
            killed.set()
            proc.kill()

    timer = threading.Timer(max(1.0, kill_at - time.time()), kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, _, body = line.partition(" ")
            if kind not in ("META", "ROW", "RATE", "STOP"):
                continue
            obj = json.loads(body)
            if kind == "META":
                res["meta"] = obj
            elif kind == "ROW":
                res["rows"].append(obj)
            elif kind == "RATE":
                res["rates"].append(obj)
            else:
                res["stop"] = obj
            print(f"  [{spec['name']}] {kind.lower()} {body.strip()}", flush=True)
        proc.wait()
    finally:
        timer.cancel()
        if log_path:
            log.close()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if killed.is_set():
        res["stop"] = {"tokens": None, "why": "killed at the time budget"}
    elif proc.returncode != 0 and res["stop"] is None:
        tail = ""
        if log_path:
            with open(log_path) as f:
                lines = [x for x in f.read().strip().splitlines() if x.strip()]
            tail = lines[-1][:300] if lines else ""
        res["stop"] = {"tokens": None, "why": f"process failed (exit {proc.returncode}): {tail}"}
    ok = [r["tokens"] for r in res["rows"] if r["ok"]]
    res["longest_ok"] = max(ok) if ok else None
    return res


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (e.g. from ``timeout``): the configuration's process goes too, not left on the device."""
    for proc in _RUNNING:
        if proc.poll() is None:
            proc.kill()
    sys.exit(128 + signum)


def configs(chunk: int, token_budget: int) -> list[dict[str, Any]]:
    """Without checkpointing first (both paths stop early there), then with it."""
    out = []
    for ckpt in (False, True):
        for name, c, budget in (("new", chunk, token_budget), ("today", 0, 0)):
            out.append(dict(name=f"{name}{'+ckpt' if ckpt else ''}", chunk=c, ckpt=ckpt, token_budget=budget))
    return out


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _tok(t: int | None) -> str:
    if t is None:
        return "-"
    return f"{t // 1024}K" if t >= 1024 and t % 1024 == 0 else str(t)


def tables(results: list[dict[str, Any]], cpu: bool) -> str:
    sizes = sorted({r["tokens"] for c in results for r in c["rows"]})
    cols = ["path", "chunk", "grad ckpt", "longest that trained", "stopped by"]
    cols += [f"{_tok(t)}: {'s' if cpu else 'peak GB'}" for t in sizes]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for c in results:
        cells = []
        for t in sizes:
            r = next((r for r in c["rows"] if r["tokens"] == t), None)
            if r is None:
                cells.append("")
            elif not r["ok"]:
                cells.append(("OOM (simulated)" if "simulated" in r["oom"] else "OOM") if r.get("oom") else "error")
            else:
                cells.append(f"{r['step_s']:.2f}" if cpu else f"{_gb(r.get('peak_allocated_gb'))}")
        stop = c["stop"] or {}
        why = stop.get("why", "-") + (f" at {_tok(stop['tokens'])}" if stop.get("tokens") else "")
        lines.append(
            f"| {c['name'].split('+')[0]} | {c['chunk']} | {'on' if c['ckpt'] else 'off'} | "
            f"{_tok(c.get('longest_ok'))} | {why} |" + "".join(f" {x} |" for x in cells)
        )
    lines += [
        "",
        "| path | grad ckpt | tokens | step s (median) | train tok/s | MFU | MFU 6N |",
        "|---|---|---|---|---|---|---|",
    ]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    for c in results:
        for r in c["rates"]:
            lines.append(
                f"| {c['name'].split('+')[0]} | {'on' if c['ckpt'] else 'off'} | {_tok(r['tokens'])} | "
                f"{r['step_s_median']:.3f} | {r['tok_s']:,.0f} | {pct(r['mfu'])} | {pct(r['mfu_6n'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: a test of the plumbing)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny student, T = 64..512")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="row lengths, in order (default 1K..64K)")
    p.add_argument("--rate-sizes", type=int, nargs="+", default=None, help="sizes also timed (default 4K 16K)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per rate size (default 3)")
    p.add_argument("--vocab", type=int, default=None, help=f"the student's vocabulary (default {QWEN3_VOCAB:,})")
    p.add_argument("--chunk", type=int, default=None, help="the new path's logprob_chunk_size (default 1024)")
    p.add_argument("--token-budget", type=int, default=16384, help="the new path's max_tokens_per_micro_batch")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2), help="the trainer's ZeRO stage")
    p.add_argument("--budget-s", type=float, default=150.0, help="the whole part's time cap")
    p.add_argument("--min-config-s", type=float, default=None, help="do not start a configuration with less left")
    p.add_argument("--grace-s", type=float, default=20.0, help="kill a process this long after the budget's end")
    p.add_argument("--simulate-oom-at", type=int, default=0, help="raise a (simulated) CUDA OOM at this size")
    p.add_argument("--json", default=None, help="write the results here (and the processes' logs beside it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    signal.signal(signal.SIGTERM, _terminated)
    t_start = time.time()
    deadline = t_start + args.budget_s
    tiny = args.tiny
    sizes = args.sizes or ([64, 128, 256, 512] if tiny else [1024 * 2**i for i in range(7)])
    rate_sizes = args.rate_sizes or ([128, 256] if tiny else [4096, 16384])
    spec_base = dict(
        cpu=args.cpu, tiny=tiny, sizes=sizes, rate_sizes=rate_sizes,
        repeats=args.repeats or (2 if tiny else 3), vocab=args.vocab or (1024 if tiny else QWEN3_VOCAB),
        k=args.topk, zero=args.zero, simulate_oom_at=args.simulate_oom_at, deadline=deadline,
    )  # fmt: skip
    chunk = args.chunk if args.chunk is not None else (64 if tiny else 1024)
    min_config_s = args.min_config_s if args.min_config_s is not None else (10.0 if args.cpu else 30.0)
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --cpu --tiny to check the script on a CPU")
    out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    print(
        f"long responses on one device: {'tiny' if tiny else 'GPU check'} student, V = {spec_base['vocab']:,}, "
        f"top-k {args.topk}, bf16, ZeRO {args.zero}, sizes {' '.join(_tok(t) for t in sizes)}, "
        f"budget {args.budget_s:.0f} s",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "spec": spec_base}
    for cfg in configs(chunk, args.token_budget):
        left = max(0.0, deadline - time.time())
        if left < min_config_s:
            res = {**cfg, "rows": [], "rates": [], "longest_ok": None,
                   "stop": {"tokens": None, "why": f"time budget ({left:.0f} s left, not started)"}}  # fmt: skip
            print(f"  [{cfg['name']}] not started: {left:.0f} s of the budget left", flush=True)
        else:
            print(f"  [{cfg['name']}] logprob_chunk_size {cfg['chunk']}, gradient checkpointing "
                  f"{'on' if cfg['ckpt'] else 'off'}, {left:.0f} s left", flush=True)  # fmt: skip
            log = os.path.join(out_dir, f"gpu_long_check_{cfg['name'].replace('+', '_')}.log") if out_dir else None
            res = run_config({**spec_base, **cfg}, log, kill_at=deadline + args.grace_s)
        results.append(res)
        report["configs"] = results
        report["wall_s"] = round(time.time() - t_start, 1)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    meta = next((c["meta"] for c in results if "meta" in c), None)
    print(
        f"\n{meta['device']}: student {meta['params'] / 1e6:.1f}M params, {meta['active_params'] / 1e6:.1f}M active"
        if meta
        else "\nno configuration got through its set-up",
        f"; one row of T tokens per step; {report['wall_s']} s in all",
        sep="",
    )
    print(tables(results, args.cpu))


if __name__ == "__main__":
    main()
