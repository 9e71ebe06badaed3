"""Peak memory and time of the trainer's loss part and of one teacher score at a real vocabulary
(V = 151,936, top-k 128, one sequence of T = 2K / 4K / 8K tokens, bf16 hidden states and head):
the full-logits path (``trainer.logprob_chunk_size: 0``, what the trainer and the HF teacher did
before issue 26) against the chunked one (mopd/logprobs.py, the default).

Each case starts from the last hidden states (1, T, H) and the head's weight (V, H):
- ``loss`` full: the head's logits (1, T, V), ``token_logprobs`` and ``logprobs_at`` (the student's
  log-probs at the teacher's 128 top-k ids), the top-k objective's loss, backward to the hidden
  states and the head's weight;
- ``loss`` chunked: the same from ``chunked_logprobs`` in chunks of ``--chunks`` positions, as the
  trainer's head computes it;
- ``score`` full / chunked: the HF teacher's log-probs of the tokens and its own top-128, no grad;
- ``step``: one ``TrainerWorker.train_step`` (DeepSpeed, ZeRO 0, one rank) of a
  tiny Qwen3 student with the real vocabulary (2 layers, hidden ``--hidden``, SDPA attention) on
  one prompt-less sequence, objective top-k, ``trainer.logprob_chunk_size`` 0 vs the chunk size;
  in ``--step-dtype`` (float32: the trainer's bf16 mode runs every GEMM of the model in bf16),
  after a warm-up step of 16 tokens that creates the optimizer state.

A case runs alone in a fresh process, smallest T first. Its figure is the process's peak resident
memory while the case runs (VmHWM, reset after set-up) minus its resident memory after set-up: the
memory the case adds to what the model already holds. Before a case the parent compares its
estimated need with the machine's free memory and skips it, saying why, when it would not fit;
while it runs, the parent kills it if the machine's free memory drops below ``--min-free-gb`` (the
machine is shared).

The head's GEMMs: this CPU (AVX2, no bf16 units) runs bf16 GEMMs 10-300x slower than fp32 ones,
so both paths run them in fp32 on the bf16 operands and round the results to bf16: the chunked
path by itself (``mopd.logprobs._gemm_dtype``), the full path through ``_Bf16Head`` (blocks of 256
rows: logits and gradients are (T, V) bf16 tensors as the plain head makes them, plus fp32 blocks
of 256 x V and, in its backward, fp32 copies of the weight and its gradient). Same values and
tensors as bf16 GEMMs, at fp32 speed.

    python benchmarks/logprob_memory.py --out results/logprob_memory.json    # ~14 min on 2 cores
    python benchmarks/logprob_memory.py --tokens 2048 --hidden 2048 --parts loss   # GEMM-bound, ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

GB = 1e9
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Estimated bytes per (T x V) element of the full path (measured at 1K-4K, rounded up) and per
# (chunk x V) element of the chunked one: what the parent checks against free memory.
FULL_BYTES = {"loss": {2: 15, 4: 18}, "score": {2: 11, 4: 13}, "step": {2: 15, 4: 16}}
CHUNK_BYTES = 12


# --------------------------------------------------------------------------- the cases (child)


class _Bf16Head(torch.autograd.Function):
    """``F.linear(hidden, weight)`` for half-precision operands with fp32 GEMMs in blocks of rows
    (see the module docstring): output and input gradients in the operands' dtype."""

    BLOCK = 256

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        h, w32 = hidden.reshape(-1, hidden.shape[-1]), weight.float()
        out = torch.empty(h.shape[0], weight.shape[0], dtype=weight.dtype)
        for s in range(0, h.shape[0], _Bf16Head.BLOCK):
            out[s : s + _Bf16Head.BLOCK] = F.linear(h[s : s + _Bf16Head.BLOCK].float(), w32)
        return out.view(*hidden.shape[:-1], -1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        h, g, w32 = hidden.reshape(-1, hidden.shape[-1]), grad.reshape(-1, weight.shape[0]), weight.float()
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w32)
        for s in range(0, h.shape[0], _Bf16Head.BLOCK):
            g_s = g[s : s + _Bf16Head.BLOCK].float()
            grad_h[s : s + _Bf16Head.BLOCK] = g_s @ w32
            grad_w.addmm_(g_s.t(), h[s : s + _Bf16Head.BLOCK].float())
        return grad_h.view_as(hidden), grad_w.to(weight.dtype)


def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype in (torch.bfloat16, torch.float16):
        return _Bf16Head.apply(hidden, weight)
    return F.linear(hidden, weight)


def make_inputs(t: int, hidden: int, vocab: int, k: int, dtype: torch.dtype, grad: bool) -> dict[str, Any]:
    """One sequence: hidden states (1, T, H) and head (V, H) (logits ~ N(0, 1)), token ids, the
    teacher's top-k ids and log-probs, rollout log-probs, a response mask (all but column 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, t, hidden, generator=g).to(dtype).requires_grad_(grad)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).requires_grad_(grad)
    mask = torch.ones(1, t, dtype=torch.bool)
    mask[:, 0] = False
    return {
        "hidden": x,
        "weight": w,
        "ids": torch.randint(0, vocab, (1, t), generator=g),
        "topk_ids": torch.randint(0, vocab, (1, t, k), generator=g),
        "topk_lp": torch.log_softmax(torch.randn(1, t, k, generator=g), -1),
        "rollout": torch.full((1, t), -12.0),
        "mask": mask,
    }


def loss_of(x: dict[str, Any], logp: torch.Tensor, student_topk: torch.Tensor) -> torch.Tensor:
    """The top-k objective's loss; the IS band is opened so that every token has a gradient."""
    from mopd.config import ObjectiveConfig
    from mopd.objective import LossInputs, get_objective

    o = ObjectiveConfig(kind="topk", topk=x["topk_ids"].shape[-1], eps_low=0.0, eps_high=float("inf"))
    inputs = LossInputs(logp, x["rollout"], x["rollout"], x["mask"], None, student_topk, x["topk_lp"])
    return get_objective("topk").loss(inputs, o)[0]


def run_case(part: str, path: str, x: dict[str, Any], chunk: int, k: int) -> None:
    from mopd.logprobs import align_to_tokens, chunked_logprobs, chunked_scores, next_token_targets
    from mopd.models import token_logprobs, topk_logprobs
    from trainers.deepspeed_trainer import logprobs_at

    h, w, ids, topk_ids = x["hidden"], x["weight"], x["ids"], x["topk_ids"]
    if part == "loss" and path == "full":
        logits = head(h, w)
        loss_of(x, token_logprobs(logits, ids), logprobs_at(logits, topk_ids)).backward()
    elif part == "loss":
        out = align_to_tokens(chunked_logprobs(h, next_token_targets(ids, topk_ids), chunk=chunk, weight=w))
        loss_of(x, out[..., 0], out[..., 1:]).backward()
    elif path == "full":  # the teacher's scores: what HFTeacherWorker._window_scores returns
        with torch.no_grad():
            logits = head(h, w)
            _ = token_logprobs(logits, ids), topk_logprobs(logits, k)
    else:
        scores = chunked_scores(h, chunk=chunk, weight=w, targets=next_token_targets(ids), topk=k)
        _ = [align_to_tokens(s) for s in scores if s is not None]


def step_worker(spec: dict[str, Any]):
    """A one-rank trainer of a tiny Qwen3 student with the real vocabulary, and a train step's
    batch maker."""
    from mopd.config import BUILTIN_TOKENIZER, ModelConfig, MOPDConfig
    from mopd.dist.runtime import free_port
    from trainers.deepspeed_trainer import TrainerWorker

    student = dict(
        model_type="qwen3", vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=2 * spec["hidden"],
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=spec["hidden"] // 4,
        max_position_embeddings=spec["tokens"] + 1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, dtype=spec["dtype"],
    )  # fmt: skip
    cfg = MOPDConfig()
    cfg.student = ModelConfig(config=student, tokenizer=BUILTIN_TOKENIZER, dtype=spec["dtype"])
    cfg.trainer.zero_stage, cfg.trainer.micro_batch_size, cfg.trainer.aux_loss_coef = 0, 1, 0.0
    cfg.trainer.bf16 = spec["dtype"] == "bfloat16"
    cfg.trainer.logprob_chunk_size = spec["chunk"]
    cfg.objective.kind, cfg.objective.topk = "topk", spec["k"]
    cfg.objective.eps_low, cfg.objective.eps_high = 0.0, float("inf")
    return TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1"))


def step_batch(t: int, vocab: int, k: int):
    from mopd.types import PromptRow, RolloutBatch, TrainBatch

    x = make_inputs(t, 8, vocab, k, torch.float32, False)
    mask = x["mask"]
    rollout = RolloutBatch(
        input_ids=x["ids"], attention_mask=torch.ones_like(mask), response_mask=mask,
        rollout_logprobs=torch.where(mask, x["rollout"], 0.0), group_ids=torch.zeros(1, dtype=torch.long),
        domains=["math"], rows=[PromptRow("", "math")], responses=[""], policy_version=0, prompt_len=1,
    )  # fmt: skip
    teacher = torch.where(mask, x["rollout"], 0.0)
    return TrainBatch(rollout, teacher, None, x["topk_ids"] * mask[..., None], x["topk_lp"] * mask[..., None])


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    import mopd.logprobs  # noqa: F401  (imports before the baseline)
    import trainers.deepspeed_trainer  # noqa: F401

    if spec["part"] == "step":
        worker = step_worker(spec)
        worker.train_step(step_batch(16, spec["vocab"], spec["k"]))  # creates the optimizer state
        batch = step_batch(spec["tokens"], spec["vocab"], spec["k"])
        run = lambda: worker.train_step(batch)  # noqa: E731
    else:
        dtype, grad = DTYPES[spec["dtype"]], spec["part"] == "loss"
        x = make_inputs(spec["tokens"], spec["hidden"], spec["vocab"], spec["k"], dtype, grad)
        run = lambda: run_case(spec["part"], spec["path"], x, spec["chunk"], spec["k"])  # noqa: E731

    base_kb = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak) to the current resident size
        peak_key = "VmHWM"
    except OSError:
        peak_key = ""
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    peak_kb = _status_kb(peak_key) if peak_key else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_gb": (peak_kb - base_kb) * 1024 / GB, "baseline_gb": base_kb * 1024 / GB, "time_s": wall}


# --------------------------------------------------------------------------- the runs (parent)


def estimate_gb(spec: dict[str, Any]) -> float:
    tv = spec["tokens"] * spec["vocab"]
    itemsize = DTYPES[spec["dtype"]].itemsize
    if spec["path"] == "full":
        return FULL_BYTES[spec["part"]][itemsize] * tv / GB
    return CHUNK_BYTES * min(spec["chunk"], spec["tokens"]) * spec["vocab"] / GB + 0.5


def run_child(spec: dict[str, Any], min_free_gb: float) -> dict[str, Any]:
    """One case in a fresh process, killed if the machine's free memory runs low."""
    import psutil

    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    low = False
    while proc.poll() is None:
        if psutil.virtual_memory().available < min_free_gb * GB:
            proc.kill()
            low = True
        time.sleep(0.1)
    out, err = proc.communicate()
    if low:
        return {"skipped": f"killed: the machine's free memory fell below {min_free_gb} GB"}
    if proc.returncode != 0:
        return {"skipped": f"failed (exit {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}"}
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--parts", nargs="+", choices=("loss", "score", "step"), default=["loss", "score", "step"])
    p.add_argument("--chunks", type=int, nargs="+", default=[1024, 256], help="chunk sizes of the chunked path")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=64, help="H: the head's GEMMs cost T x H x V (memory does not)")
    p.add_argument("--topk", type=int, default=128)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--step-dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-free-gb", type=float, default=1.5)
    p.add_argument("--out", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import psutil

    from _bench import machine, write_json

    before = machine()
    rows = []
    for t in sorted(args.tokens):
        for part in args.parts:
            for path, chunk in [("full", 0)] + [("chunked", c) for c in args.chunks]:
                spec = dict(
                    part=part, path=path, chunk=chunk, tokens=t, vocab=args.vocab, hidden=args.hidden,
                    k=args.topk, dtype=args.step_dtype if part == "step" else args.dtype, threads=args.threads,
                )  # fmt: skip
                need, free = estimate_gb(spec), psutil.virtual_memory().available / GB
                if need + args.min_free_gb > free:
                    res = {"skipped": f"needs ~{need:.1f} GB, {free:.1f} GB free"}
                else:
                    res = run_child(spec, args.min_free_gb)
                rows.append({**spec, **res, "load_avg_1": round(os.getloadavg()[0], 2)})
                print(row_text(rows[-1]), flush=True)
    print()
    print(table(rows))
    write_json(args.out, {"args": vars(args), "machine_before": before, "machine_after": machine(), "rows": rows})


def row_text(r: dict[str, Any]) -> str:
    name = f"{r['part']:5s} T={r['tokens']:5d} {r['path']}" + (f" chunk={r['chunk']}" if r["chunk"] else "")
    if "skipped" in r:
        return f"{name}: skipped ({r['skipped']})"
    return f"{name}: +{r['peak_gb']:.2f} GB peak, {r['time_s']:.1f} s (load {r['load_avg_1']})"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per part and T, the full path's figures against each chunk size's."""
    lines = ["| part | T | full: peak GB | full: s | chunked (chunk) | peak GB | s | peak vs full | time vs full |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["path"] != "chunked":
            continue
        full = next(f for f in rows if f["path"] == "full" and f["part"] == r["part"] and f["tokens"] == r["tokens"])
        fp = f"{full['peak_gb']:.2f}" if "peak_gb" in full else "skipped"
        ft = f"{full['time_s']:.1f}" if "time_s" in full else "-"
        if "peak_gb" not in r:
            lines.append(f"| {r['part']} | {r['tokens']} | {fp} | {ft} | {r['chunk']} | skipped | - | - | - |")
            continue
        vs_peak = f"{100 * (r['peak_gb'] / full['peak_gb'] - 1):+.0f}%" if "peak_gb" in full else "-"
        vs_time = f"{r['time_s'] / full['time_s']:.2f}x" if "time_s" in full else "-"
        lines.append(
            f"| {r['part']} | {r['tokens']} | {fp} | {ft} | {r['chunk']} | {r['peak_gb']:.2f} | "
            f"{r['time_s']:.1f} | {vs_peak} | {vs_time} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
