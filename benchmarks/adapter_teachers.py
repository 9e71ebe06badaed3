"""Three teachers as three full models against one base with three LoRA adapters (adapter
teachers, ``teachers.<d>.adapter``): the resident memory of the teacher workers and the time to
score a batch that mixes the three domains.

For each model (SmolLM2-135M-Instruct, converted by scripts/real_model.py, and the quickstart's tiny
MiMoV2Flash student) the script makes three random LoRA adapters (r = ``--rank``, every linear layer
of the blocks) and their merged models, then runs each case in fresh processes, as the teacher pool's
actors would run:

- ``full``: three workers, one per domain, each an ``HFTeacherWorker`` of a merged model, each
  scoring its domain's rows of the batch;
- ``adapters``: one ``HFTeacherWorker`` holding the base once and the three adapters, scoring the
  whole mixed batch in one call (each row through its domain's adapter).

A worker's figure is its process's resident memory (VmRSS) after it loaded and scored, minus the
resident memory of the same process before it built the worker (Python, torch, transformers and
peft imported): the bytes the worker itself holds. Time: each process runs one torch thread; the
full case's time is the sum of its three workers' (they would share the cores), each the best of
``--repeats`` calls after a warm-up call.

    python benchmarks/adapter_teachers.py --out results/adapter_teachers.json     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("math", "code", "agent")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# --------------------------------------------------------------------------- set-up (parent)


def make_models(name: str, base: Path, out: Path, rank: int) -> dict[str, str]:
    """Three adapters of ``base`` and their merged models under ``out``; returns their paths."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = {"base": str(base)}
    tok = AutoTokenizer.from_pretrained(base)
    for i, d in enumerate(DOMAINS):
        adapter, merged = out / name / d / "adapter", out / name / d / "merged"
        paths[d], paths[f"{d}_merged"] = str(adapter), str(merged)
        if (merged / "config.json").exists():
            continue
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        targets = [t for t in TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(adapter)
        peft_model.merge_and_unload().save_pretrained(merged)
        tok.save_pretrained(merged)
    return paths


def tiny_student(out: Path) -> Path:
    """The quickstart's tiny MiMoV2Flash student (random weights), saved with the char tokenizer."""
    from mopd.config import load_config
    from mopd.models import build_char_tokenizer, load_model

    path = out / "tiny" / "base"
    if not (path / "config.json").exists():
        student = load_config(ROOT / "recipes" / "quickstart.yaml").student
        load_model(student, seed=0).save_pretrained(path)
        build_char_tokenizer().save_pretrained(path)
    return path


def smollm2(out: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "real_model.py")], capture_output=True, text=True, check=True
    )
    return Path(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- one worker (child)


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401  (imported before the baseline: the worker's bytes only)
    import transformers  # noqa: F401

    from mopd.config import TeacherConfig
    from teachers.hf import HFTeacherWorker

    spec = json.loads(args.child)
    batch = torch.load(spec["batch"], weights_only=True)
    before = rss_bytes()
    cfg = TeacherConfig(path=spec["path"], batch_size=64, adapter=spec.get("adapter"))
    w = HFTeacherWorker(spec["name"], cfg, 0, set_threads=False, adapters=spec.get("adapters"))
    rows = torch.tensor([i for i, d in enumerate(batch["domains"]) if d in spec["domains"]])
    ids, am, rm = (batch[k][rows] for k in ("input_ids", "attention_mask", "response_mask"))
    domains = [batch["domains"][i] for i in rows.tolist()] if spec.get("adapters") else None
    times = []
    for _ in range(spec["repeats"] + 1):  # the first call is a warm-up
        start = time.perf_counter()
        w.score(ids, am, rm, topk=spec["topk"], domains=domains)
        times.append(time.perf_counter() - start)
    print(json.dumps({"rss_bytes": rss_bytes() - before, "score_s": min(times[1:]), "rows": len(rows)}))


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_batch(path: Path, vocab: int, rows_per_domain: int, prompt: int, response: int) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    n = rows_per_domain * len(DOMAINS)
    ids = torch.randint(3, min(vocab, 30000), (n, prompt + response), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    rm = torch.zeros_like(am)
    rm[:, prompt:] = True
    domains = [DOMAINS[i % len(DOMAINS)] for i in range(n)]
    torch.save({"input_ids": ids, "attention_mask": am, "response_mask": rm, "domains": domains}, path)


def compare(name: str, paths: dict[str, str], batch: Path, args: argparse.Namespace) -> dict:
    common = {"batch": str(batch), "repeats": args.repeats, "topk": args.topk}
    full = [run_child({**common, "name": d, "path": paths[f"{d}_merged"], "domains": [d]}) for d in DOMAINS]
    adapters = {d: paths[d] for d in DOMAINS}
    one = run_child(
        {**common, "name": "+".join(DOMAINS), "path": paths["base"], "adapters": adapters, "domains": list(DOMAINS)}
    )
    mb = 1e6
    out = {
        "model": name,
        "full_rss_mb_per_worker": [round(r["rss_bytes"] / mb, 1) for r in full],
        "full_rss_mb_total": round(sum(r["rss_bytes"] for r in full) / mb, 1),
        "adapters_rss_mb": round(one["rss_bytes"] / mb, 1),
        "full_score_s": round(sum(r["score_s"] for r in full), 3),
        "adapters_score_s": round(one["score_s"], 3),
        "rows": one["rows"],
    }
    out["memory_ratio"] = round(out["adapters_rss_mb"] / out["full_rss_mb_total"], 3)
    out["time_ratio"] = round(out["adapters_score_s"] / out["full_score_s"], 3)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--work", default=str(Path(os.environ.get("MOPD_CACHE", Path.home() / ".cache" / "mopd")) / "bench_adapters")
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows-per-domain", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--response", type=int, default=96)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="smollm2,tiny")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from mopd.models import CHAR_VOCAB_SIZE

    work = Path(args.work)
    results = []
    for name in args.models.split(","):
        base = smollm2(work) if name == "smollm2" else tiny_student(work)
        paths = make_models(name, base, work, args.rank)
        vocab = 49152 if name == "smollm2" else CHAR_VOCAB_SIZE
        batch = work / f"{name}_batch.pt"
        make_batch(batch, vocab, args.rows_per_domain, args.prompt, args.response)
        results.append(compare(name, paths, batch, args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
